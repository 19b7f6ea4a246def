import json

from bench.outputs import write_json, write_results


def test_write_results_writes_each_given_output(tmp_path):
    result = {"a": [1, 2], "name": "voix é"}
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    write_results(result, "| table |\n", js, md, indent=1)
    assert js.read_text() == json.dumps(result, indent=1) + "\n"
    assert md.read_text() == "| table |\n"


def test_write_results_skips_outputs_not_asked_for(tmp_path):
    write_results({"a": 1}, "text", None, None)
    assert list(tmp_path.iterdir()) == []


def test_write_json_keeps_non_ascii_when_asked(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"t": "é"}, indent=1, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{\n "t": "é"\n}\n'
