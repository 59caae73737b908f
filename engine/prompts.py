"""Render the system/user prompt texts for one mission and dataset (SPEC section 3).

Pure Python (no torch) so the producer and tests can render prompts without a GPU stack. Texts
come from stage_a data files; this module only decides the order and the short headings.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from stage_a.errors import UserError
from stage_a.missions import (
    DATASETS,
    DataDir,
    Mission,
    get_domain,
    get_mission,
    get_profile,
    list_missions,
    resolve_dataset,
)

DEFAULT_PROFILE = "summary_runtime"


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


def _bullets(items: tuple[str, ...]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def _fill(template: str, *, domain: str, task: str, where: str) -> str:
    # string.Template rather than str.format: the instruction contains literal JSON braces.
    try:
        return string.Template(template).substitute(domain=domain, task=task)
    except (KeyError, ValueError) as exc:
        raise UserError(
            f"prompt profile {where}: bad placeholder ({exc}); use ${{domain}} or ${{task}}"
        ) from exc


def build_prompt(
    mission: Mission, dataset: str, profile: str = DEFAULT_PROFILE, *, data_dir: DataDir = None
) -> Prompt:
    """System = base + irrelevant rule + mission rules; user = instruction + domain + limits + focus."""
    dataset = resolve_dataset(mission, dataset)
    prof = get_profile(profile, data_dir=data_dir)
    domain = get_domain(dataset, data_dir=data_dir)

    def fill(text: str, field: str) -> str:
        return _fill(text, domain=dataset, task=mission.name, where=f"'{profile}'.{field}")

    system_parts = [fill(prof.system_base, "system_base"), fill(prof.irrelevant_rule, "irrelevant_rule")]
    if mission.rules:
        system_parts.append(f"【任务规则：{mission.name}】\n{_bullets(mission.rules)}")

    user_parts = [
        fill(prof.user_instruction, "user_instruction"),
        f"【领域说明：{dataset.upper()}】\n{domain.hint}\n可用类别：{'、'.join(domain.categories)}",
    ]
    if domain.scenario_limits:
        user_parts.append(f"【场景限制】\n{_bullets(domain.scenario_limits)}")
    user_parts.append(f"【任务关注点：{mission.name}】\n{mission.focus}")

    return Prompt(system="\n\n".join(system_parts), user="\n\n".join(user_parts))


def prompt_corpus(profile: str = DEFAULT_PROFILE, *, data_dir: DataDir = None) -> list[str]:
    """Every system and user text for every mission x dataset, in a stable order."""
    texts: list[str] = []
    for name in list_missions(data_dir=data_dir):
        mission = get_mission(name, data_dir=data_dir)
        for dataset in DATASETS:
            prompt = build_prompt(mission, dataset, profile, data_dir=data_dir)
            texts += [prompt.system, prompt.user]
    return texts
