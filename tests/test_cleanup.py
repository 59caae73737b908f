"""SPEC section 5: summary clean-up."""

from __future__ import annotations

import json

import pytest

from stage_a.cleanup import CANONICAL_KEYS, clean_summary

HEADER = "<DOMAIN=bbu>, <TASK=挡风板安装检查>"
OBJ = {"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["机柜门未关"]}
CANON = '{"统计": [{"类别": "BBU设备", "品牌": {"华为": 1}}], "备注": ["机柜门未关"]}'


def test_canonical_keys_exported() -> None:
    assert CANONICAL_KEYS == ("统计", "备注", "分组统计")


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_is_failure(text: str) -> None:
    assert clean_summary(text) == ""


def test_header_only_is_failure() -> None:
    # A header without any summary after it carries nothing: treated as an empty result.
    assert clean_summary(f"  {HEADER}\n  ") == ""


def test_strips_surrounding_whitespace_of_prose() -> None:
    assert clean_summary("  \n 图片模糊，无法判断 \n\t") == "图片模糊，无法判断"


@pytest.mark.parametrize(
    "text",
    [
        "无关图片",
        "  无关图片  ",
        "\n无关图片。这是一张CAD图纸",
        '无关图片\n{"统计": []}',
        f"{HEADER}\n无关图片",
    ],
)
def test_irrelevant_collapses(text: str) -> None:
    assert clean_summary(text) == "无关图片"


def test_irrelevant_not_at_start_is_kept() -> None:
    text = "这张图与任务无关图片"
    assert clean_summary(text) == text


def test_header_dropped_and_json_canonicalised() -> None:
    assert clean_summary(f"{HEADER}\n{json.dumps(OBJ, ensure_ascii=False)}") == CANON


def test_header_with_fullwidth_comma_and_spaces() -> None:
    text = f"  <DOMAIN=rru> ， <TASK=RRU线缆>  \n{json.dumps(OBJ)}"
    assert clean_summary(text) == CANON


def test_whole_text_json_compact_separators_reformatted() -> None:
    compact = json.dumps(OBJ, ensure_ascii=False, separators=(",", ":"))
    assert clean_summary(compact) == CANON


def test_whole_text_json_spanning_lines() -> None:
    pretty = json.dumps(OBJ, ensure_ascii=False, indent=2)
    assert clean_summary(f"{HEADER}\n{pretty}\n") == CANON


def test_non_ascii_kept_and_ascii_escapes_decoded() -> None:
    out = clean_summary(json.dumps(OBJ))  # input uses \\uXXXX escapes
    assert out == CANON
    assert "\\u" not in out and "华为" in out


def test_last_json_line_among_prose() -> None:
    first = json.dumps({"统计": [{"类别": "光纤"}]}, ensure_ascii=False)
    last = json.dumps({"统计": [{"类别": "电线"}]}, ensure_ascii=False)
    text = f"{HEADER}\n好的，以下是结果：\n{first}\n修正后：\n{last}\n以上。"
    assert clean_summary(text) == '{"统计": [{"类别": "电线"}]}'


def test_last_json_line_must_contain_stats() -> None:
    good = json.dumps({"统计": [{"类别": "光纤"}]}, ensure_ascii=False)
    text = f'说明\n{good}\n{{"note": 1}}\n结束'
    assert clean_summary(text) == '{"统计": [{"类别": "光纤"}]}'


def test_widest_span_when_no_line_is_an_object() -> None:
    text = '结果如下 {"统计": [{"类别": "标签", "文本": {"A1": 1}}]} 请查收'
    assert clean_summary(text) == '{"统计": [{"类别": "标签", "文本": {"A1": 1}}]}'


def test_widest_span_across_lines() -> None:
    text = '结果如下：{"统计": [\n{"类别": "标签"}\n]} 完毕'
    assert clean_summary(text) == '{"统计": [{"类别": "标签"}]}'


def test_json_without_stats_is_kept_as_is() -> None:
    text = '  {"类别": "BBU设备"}  '
    assert clean_summary(text) == '{"类别": "BBU设备"}'


def test_broken_json_kept_as_is_including_header() -> None:
    text = f'{HEADER}\n{{"统计": [{{"类别": "BBU设备"}}'
    assert clean_summary(f"  {text}\n") == text


def test_nan_is_not_accepted_as_json() -> None:
    text = '{"统计": [{"类别": "光纤", "长度": NaN}]}'
    assert clean_summary(text) == text


def test_repair_stats_assignment() -> None:
    text = f'{HEADER}\n统计=[{{"类别": "尾纤", "保护套": {{"有": 2}}}}]'
    assert clean_summary(text) == '{"统计": [{"类别": "尾纤", "保护套": {"有": 2}}]}'


@pytest.mark.parametrize("sep", ["\n", ", ", "，", "; ", " "])
def test_repair_stats_and_group_stats(sep: str) -> None:
    text = f'统计=[{{"类别": "站点距离"}}]{sep}分组统计=[{{"组": 1}}]'
    assert clean_summary(text) == '{"统计": [{"类别": "站点距离"}], "分组统计": [{"组": 1}]}'


@pytest.mark.parametrize(
    "text",
    [
        '统计=[{"类别": "尾纤"}] 其他说明',  # trailing prose: ambiguous
        '说明 统计=[{"类别": "尾纤"}]',  # leading prose: ambiguous
        '统计={"类别": "尾纤"}',  # not a list
        '统计=[{"类别": "尾纤"}]\n分组统计=[{"组": 1}',  # broken second part
    ],
)
def test_ambiguous_assignment_not_repaired(text: str) -> None:
    assert clean_summary(text) == text


def test_key_order_canonicalised_others_keep_order() -> None:
    text = '{"z": 1, "分组统计": [], "a": 2, "备注": ["x"], "统计": []}'
    assert clean_summary(text) == '{"统计": [], "备注": ["x"], "分组统计": [], "z": 1, "a": 2}'


def test_nested_key_order_preserved() -> None:
    text = '{"统计": [{"类别": "BBU设备", "数量": 1, "品牌": {"爱立信": 1}}]}'
    assert clean_summary(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "无关图片",
        "图片模糊",
        f'{HEADER}\n{{"统计":[], "备注":[]}}',
        f'{HEADER}\n统计=[{{"类别": "x"}}]',
        '前言 {"统计": [{"类别": "标签"}]} 后记',
        f"{HEADER}\n说明文字",
    ],
)
def test_idempotent(text: str) -> None:
    once = clean_summary(text)
    assert clean_summary(once) == once
