"""SPEC section 6: the output record contract."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from stage_a.records import GroupRecord, RecordError, validate_record


def rec(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "group_id": "QC-TEMP-20241206-0015502",
        "mission": "挡风板安装检查",
        "label": "fail",
        "images": ["a_1.jpeg", "a_2.jpeg"],
        "per_image": {"image_1": "无关图片", "image_2": '{"统计": []}'},
    }
    d.update(over)
    return d


def test_valid_record_passes() -> None:
    validate_record(rec())
    validate_record(rec(label="pass"))


def test_round_trip_and_key_order() -> None:
    r = GroupRecord.from_dict(rec())
    line = r.to_json_line()
    assert line.endswith("\n") and line.count("\n") == 1
    d = json.loads(line)
    assert list(d) == ["group_id", "mission", "label", "images", "per_image"]
    assert d == rec()
    assert "挡风板" in line  # ensure_ascii=False


def test_gt_fields_serialised_after_core_keys() -> None:
    r = GroupRecord.from_dict(rec())
    r.set_fail_reasons(["b", "a", "b", ""])
    d = json.loads(r.to_json_line())
    assert list(d)[-2:] == ["gt_fail_reason_texts", "gt_fail_reason_text"]
    assert d["gt_fail_reason_texts"] == ["a", "b"] and d["gt_fail_reason_text"] == "a | b"
    assert GroupRecord.from_dict(d) == r


def test_gt_fields_null_text_when_no_reason() -> None:
    r = GroupRecord.from_dict(rec())
    r.set_fail_reasons([])
    d = json.loads(r.to_json_line())
    assert d["gt_fail_reason_texts"] == [] and d["gt_fail_reason_text"] is None


def test_per_image_written_in_image_order() -> None:
    r = GroupRecord.from_dict(rec(per_image={"image_2": "b", "image_1": "a"}))
    assert list(json.loads(r.to_json_line())["per_image"]) == ["image_1", "image_2"]


@pytest.mark.parametrize("key", ["group_id", "mission", "label", "images", "per_image"])
def test_missing_key(key: str) -> None:
    d = rec()
    del d[key]
    with pytest.raises(RecordError, match=f"missing key.*{key}"):
        validate_record(d)


def test_not_an_object() -> None:
    with pytest.raises(RecordError, match="JSON object"):
        validate_record([rec()])


def test_unknown_key() -> None:
    with pytest.raises(RecordError, match="unknown key.*extra"):
        validate_record(rec(extra=1))


@pytest.mark.parametrize("field", ["group_id", "mission"])
@pytest.mark.parametrize("value", ["", "  ", None, 3])
def test_bad_id_fields(field: str, value: Any) -> None:
    with pytest.raises(RecordError, match=field):
        validate_record(rec(**{field: value}))


@pytest.mark.parametrize("label", ["PASS", "ok", "", None, 1])
def test_bad_label(label: Any) -> None:
    with pytest.raises(RecordError, match="label"):
        validate_record(rec(label=label))


@pytest.mark.parametrize("images", [[], "a.jpg", None, ["a.jpg", ""], ["a.jpg", 3], ["a.jpg", "a.jpg"]])
def test_bad_images(images: Any) -> None:
    d = rec(images=images)
    if isinstance(images, list) and images:
        d["per_image"] = {f"image_{i + 1}": "x" for i in range(len(images))}
    with pytest.raises(RecordError, match="images"):
        validate_record(d)


@pytest.mark.parametrize(
    "per_image",
    [
        {"image_1": "x"},  # N too small
        {"image_1": "x", "image_2": "y", "image_3": "z"},  # N too big
        {"image_0": "x", "image_1": "y"},  # wrong numbering
        {"image_1": "x", "image_3": "y"},  # gap
        {"1": "x", "2": "y"},
        ["x", "y"],
    ],
)
def test_wrong_per_image_keys(per_image: Any) -> None:
    with pytest.raises(RecordError, match="per_image"):
        validate_record(rec(per_image=per_image))


@pytest.mark.parametrize("summary", ["", "   ", None, 1, ["x"]])
def test_empty_or_non_string_summary(summary: Any) -> None:
    with pytest.raises(RecordError, match="per_image.image_2"):
        validate_record(rec(per_image={"image_1": "x", "image_2": summary}))


def test_gt_fields_on_pass_record_refused() -> None:
    d = rec(label="pass", gt_fail_reason_texts=["a"], gt_fail_reason_text="a")
    with pytest.raises(RecordError, match="only allowed on fail"):
        validate_record(d)
    with pytest.raises(RecordError, match="only allowed on fail"):
        validate_record(rec(label="pass", gt_fail_reason_text=None))


@pytest.mark.parametrize(
    "texts, text, match",
    [
        (["b", "a"], "b | a", "sorted"),
        (["a", "a"], "a | a", "sorted and distinct"),
        (["a", ""], " | a", "non-empty"),
        ("a", "a", "list"),
        (["a", "b"], "a|b", "gt_fail_reason_text must be"),
        ([], "", "gt_fail_reason_text must be None"),
        (["a"], None, "gt_fail_reason_text must be"),
    ],
)
def test_bad_gt_fields(texts: Any, text: Any, match: str) -> None:
    with pytest.raises(RecordError, match=match):
        validate_record(rec(gt_fail_reason_texts=texts, gt_fail_reason_text=text))


def test_gt_fields_go_together() -> None:
    with pytest.raises(RecordError, match="together"):
        validate_record(rec(gt_fail_reason_texts=["a"]))


def test_to_json_line_validates() -> None:
    r = GroupRecord.from_dict(rec())
    r.per_image["image_2"] = ""
    with pytest.raises(RecordError):
        r.to_json_line()


def test_from_dict_copies_input() -> None:
    d = rec()
    r = GroupRecord.from_dict(d)
    r.per_image["image_1"] = "changed"
    r.images.append("z.jpg")
    assert d == rec() and d == copy.deepcopy(rec())
