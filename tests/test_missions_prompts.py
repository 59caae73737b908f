"""Missions, domain packs and prompt rendering are data-driven and match SPEC sections 2-3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import stage_a
from engine.prompts import Prompt, build_prompt, prompt_corpus
from stage_a import missions as m
from stage_a.errors import UserError
from stage_a.settings import Settings

SPEC_MISSIONS = {
    "BBU安装方式检查（正装）": "bbu",
    "BBU接地线检查": "bbu",
    "BBU线缆布放要求": "bbu",
    "挡风板安装检查": "bbu",
    "RRU安装检查": "rru",
    "RRU位置检查": "rru",
    "RRU线缆": "rru",
}
BBU_CATEGORIES = (
    "BBU设备",
    "挡风板",
    "光纤",
    "电线",
    "标签",
    "BBU安装螺丝",
    "机柜处接地螺丝",
    "地排处接地螺丝",
    "ODF端光纤插头",
    "BBU端光纤插头",
)
RRU_CATEGORIES = ("RRU设备", "紧固件", "RRU接地端", "地排接地端螺丝", "尾纤", "接地线", "标签", "站点距离")
BAFFLE = "挡风板安装检查"
PACKAGE_DATA = Path(stage_a.__file__).parent / "data"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(m.DATA_DIR_ENV, raising=False)


def _prompt(name: str, dataset: str | None = None) -> Prompt:
    mission = m.get_mission(name)
    return build_prompt(mission, m.resolve_dataset(mission, dataset))


def test_all_spec_missions_load_with_their_dataset() -> None:
    assert m.list_missions() == list(SPEC_MISSIONS)
    for name, dataset in SPEC_MISSIONS.items():
        mission = m.get_mission(name)
        assert (mission.name, mission.dataset) == (name, dataset)
        assert mission.focus.strip()


def test_unknown_mission_lists_supported() -> None:
    # ASCII parentheses are a realistic typo for the full-width ones in the real name.
    with pytest.raises(UserError) as err:
        m.get_mission("BBU安装方式检查(正装)")
    msg = str(err.value)
    assert msg.startswith("unknown mission 'BBU安装方式检查(正装)'; supported: ")
    assert all(name in msg for name in SPEC_MISSIONS)


def test_dataset_default_override_and_validation() -> None:
    mission = m.get_mission("RRU线缆")
    assert m.resolve_dataset(mission, None) == "rru"
    assert m.resolve_dataset(mission, "") == "rru"
    assert m.resolve_dataset(mission, "bbu") == "bbu"
    assert m.resolve_dataset(mission, " BBU ") == "bbu"
    with pytest.raises(UserError, match="supported: bbu, rru"):
        m.resolve_dataset(mission, "gsm")
    with pytest.raises(UserError, match="supported: bbu, rru"):
        m.get_domain("gsm")
    # The override really changes the domain pack in the rendered prompt.
    assert "站点距离" not in build_prompt(mission, "bbu").user
    assert "<DOMAIN=bbu>, <TASK=RRU线缆>" in build_prompt(mission, "bbu").user


def test_categories_exactly_as_spec() -> None:
    assert m.get_domain("bbu").categories == BBU_CATEGORIES
    assert m.get_domain("rru").categories == RRU_CATEGORIES
    assert "可用类别：" + "、".join(BBU_CATEGORIES) in _prompt("BBU接地线检查").user


def test_baffle_rules_only_in_baffle_system_prompt() -> None:
    rules = m.get_mission(BAFFLE).rules
    assert len(rules) == 3
    assert any("爱立信" in r for r in rules)
    assert any("黄色箭头" in r for r in rules)
    assert any("堆叠" in r and "单台" in r for r in rules)
    baffle = _prompt(BAFFLE)
    assert all(r in baffle.system for r in rules)
    assert not any(r in baffle.user for r in rules)
    for name in SPEC_MISSIONS:
        if name == BAFFLE:
            continue
        for dataset in m.DATASETS:
            system = _prompt(name, dataset).system
            assert not any(r in system for r in rules), name
            assert "爱立信" not in system and "黄色箭头" not in system, name


def test_rru_limits_only_in_rru_user_prompts() -> None:
    rru_limits = m.get_domain("rru").scenario_limits
    bbu_limits = m.get_domain("bbu").scenario_limits
    for name, dataset in SPEC_MISSIONS.items():
        user = _prompt(name).user
        if dataset == "rru":
            assert "站点距离" in user and "分组统计" in user
            assert all(lim in user for lim in rru_limits)
            assert not any(lim in user for lim in bbu_limits)
        else:
            assert "站点距离" not in user
            assert all(lim in user for lim in bbu_limits)
            assert not any(lim in user for lim in rru_limits)
        assert m.get_mission(name).focus in user


def test_irrelevant_rule_and_contract_in_every_prompt() -> None:
    rule = m.get_profile("summary_runtime").irrelevant_rule
    for name in SPEC_MISSIONS:
        for dataset in m.DATASETS:
            p = _prompt(name, dataset)
            assert rule in p.system
            for word in ("CAD", "截图", "聊天", "收据", "无关图片"):
                assert word in p.system
            assert f"<DOMAIN={dataset}>, <TASK={name}>" in p.user
            for word in ("无关图片", '"统计"', '"类别"', '"备注"', '"分组统计"', "可读性=不可读", "坐标"):
                assert word in p.user
            assert "$" not in p.system + p.user  # every placeholder substituted


def test_profiles_and_determinism() -> None:
    assert m.PROFILES == ("summary_runtime",)
    mission = m.get_mission(BAFFLE)
    assert build_prompt(mission, "bbu") == build_prompt(mission, "bbu", "summary_runtime")
    with pytest.raises(UserError, match="unknown prompt profile 'nope'; supported: summary_runtime"):
        build_prompt(mission, "bbu", "nope")
    corpus = prompt_corpus()
    assert len(corpus) == len(SPEC_MISSIONS) * len(m.DATASETS) * 2
    assert corpus == prompt_corpus()
    assert all(len(t) > 200 for t in corpus)


def _copy_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(PACKAGE_DATA, data)
    return data


def test_new_mission_is_a_data_only_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _copy_data(tmp_path)
    path = data / "missions.json"
    missions = json.loads(path.read_text(encoding="utf-8"))
    missions["RRU天线检查"] = {"dataset": "rru", "focus": "天线方位角标签可读。", "rules": ["天线规则甲。"]}
    path.write_text(json.dumps(missions, ensure_ascii=False), encoding="utf-8")

    new = m.get_mission("RRU天线检查", data_dir=data)
    assert new.dataset == "rru" and new.rules == ("天线规则甲。",)
    p = build_prompt(new, "rru", data_dir=data)
    assert "天线规则甲。" in p.system and "天线方位角标签可读。" in p.user
    assert "RRU天线检查" not in m.list_missions()  # package data untouched

    monkeypatch.setenv(m.DATA_DIR_ENV, str(data))
    data_dir = Settings.from_env().data_dir  # what an entry point passes down
    assert m.list_missions(data_dir=data_dir)[-1] == "RRU天线检查"
    assert len(prompt_corpus(data_dir=data_dir)) == (len(SPEC_MISSIONS) + 1) * len(m.DATASETS) * 2


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"X": {"dataset": "gsm", "focus": "f", "rules": []}}', "dataset 'gsm'"),
        ('{"X": {"dataset": "bbu", "focus": "", "rules": []}}', "'focus'"),
        (
            '{"X": {"dataset": "bbu", "focus": "f"}, "X": {"dataset": "rru", "focus": "f"}}',
            "duplicate key 'X'",
        ),
        ("{not json", "cannot read data file"),
    ],
)
def test_bad_mission_data_is_a_clear_user_error(tmp_path: Path, content: str, needle: str) -> None:
    data = _copy_data(tmp_path)
    (data / "missions.json").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=needle):
        m.list_missions(data_dir=data)


def test_missing_data_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        m.list_missions(data_dir=tmp_path / "missing")
