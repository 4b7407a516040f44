"""The evaluation report of a model `imclass tune` retrained shows the study (issue 16): best parameters equal
to best.json's, the top trials of trials.csv, and the tune's plots copied next to report.html and embedded;
`imclass tune --report DIR` writes the same report at the end of the search."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imclass.cli import app
from imclass.evaluate.report import report
from imclass.evaluate.tune_folder import top_trials as _top_trials, tuning_folder
from imclass.tuning.search import TuneConfig, tune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPACE = {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
         "width": {"type": "int", "low": 8, "high": 32}, "depth": 1}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _section(page: str) -> str:
    found = re.search(r'<section id="tuning">.*?</section>', page, re.S)
    assert found, "no tuning section in the report"
    return found.group(0)


def _params_of(table_html: str) -> dict:
    """{name: value} of the cells carrying data-param / data-value (the exact JSON of the value)."""
    import html

    return {html.unescape(name): json.loads(html.unescape(value))
            for name, value in re.findall(r'data-param="([^"]*)" data-value="([^"]*)"', table_html)}


def _lookup(numbers: dict, key: str):
    value = numbers
    for part in key.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _check_shown_numbers(section: str, numbers: dict) -> int:
    """Every data-key number of the section is the JSON's figure (as the report's own page test does)."""
    shown = re.findall(r'data-key="([^"]+)">([^<]+)<', section)
    for key, text in shown:
        assert float(text.replace(",", "")) == pytest.approx(_lookup(numbers, key), abs=5e-5), key
    return len(shown)


def test_evaluate_report_of_a_tuned_knn_shows_best_params_top_trials_and_plots(tmp_path, data_root):
    out, rep = tmp_path / "tune-knn", tmp_path / "report"
    _invoke("tune", "--model", "knn", "--dataset", "cifar10", "--data", str(data_root), "--limit", "300",
            "--trials", "12", "--sampler", "random", "--out", str(out))
    best = json.loads((out / "best.json").read_text())
    assert best["model_file"] == str(out / "model.safetensors") and best["trials"] == {"complete": 12}
    _invoke("evaluate", str(out), "cifar10", "--data", str(data_root), "--limit", "300", "--report", str(rep))

    numbers = json.loads((rep / "report.json").read_text())
    tuning = numbers["tuning"]
    assert tuning["best_params"] == best["best_params"] and tuning["best_trial"] == best["best_trial"]
    assert tuning["val_accuracy"] == best["val_accuracy"] and tuning["test_accuracy"] == best["test_accuracy"]
    # the k-NN's report on the same 300 test images scores what tune's final step measured
    assert numbers["accuracy"] == pytest.approx(best["test_accuracy"], abs=1 / 300 + 1e-9)

    # top 10 of the 12 trials of trials.csv, best first; the first is the best trial
    rows = (out / "trials.csv").read_text().splitlines()[1:]
    values = sorted((float(r.split(",")[2]) for r in rows), reverse=True)
    assert [t["val_accuracy"] for t in tuning["top_trials"]] == values[:10] and tuning["trials_listed"] == 12
    assert tuning["top_trials"][0]["val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert {"k", "metric"} <= set(tuning["top_trials"][0]["params"])

    page = (rep / "report.html").read_text()
    section = _section(page)
    best_table = re.search(r'<table id="tuning-best">.*?</table>', section, re.S).group(0)
    assert _params_of(best_table) == best["best_params"]
    trial_rows = re.findall(r"<tr><td>(\d+)</td>", re.search(r'<table id="tuning-trials">.*?</table>', section,
                                                             re.S).group(0))
    assert [int(n) for n in trial_rows] == [t["number"] for t in tuning["top_trials"]]
    assert _check_shown_numbers(section, numbers) >= 12

    # the plots: copied next to report.html (non-empty PNGs, the tune's own bytes) and embedded in the page
    made = [name for name in ("history", "importances", "params") if (out / f"{name}.png").is_file()]
    assert {"history", "params"} <= set(made)
    for name in made:
        copied = rep / numbers["files"][f"tune_{name}"]
        data = copied.read_bytes()
        assert copied.parent == rep and len(data) > 1000 and data.startswith(PNG_SIGNATURE)
        assert data == (out / f"{name}.png").read_bytes()
        assert f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"' in section
    assert section.count("<img ") == len(made)

    # the model file inside the tune folder is recognised too; a plain run folder is not a tune's
    assert tuning_folder(out / "model.safetensors") == out == tuning_folder(out)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    assert tuning_folder(plain) is None
    r = report(plain, _test_set(data_root), tmp_path / "plain-report", progress=False)
    assert r["tuning"] is None and 'id="tuning"' not in (tmp_path / "plain-report" / "report.html").read_text()
    assert not list((tmp_path / "plain-report").glob("tune_*.png"))


def _test_set(data_root: Path):
    import imclass

    return imclass.data.load("cifar10", split="test", root=str(data_root)).subset(slice(0, 300))


def test_tune_with_report_writes_the_final_models_report_with_the_tuning_section(tmp_path, data_root):
    out, rep = tmp_path / "tune-mlp", tmp_path / "tune-mlp" / "report"
    result = tune(TuneConfig(model="mlp", dataset="cifar10", data_root=str(data_root), limit=300, epochs=1,
                             trials=3, space=SPACE, out=str(out), device="cpu", pruner="none", report=str(rep)))
    assert result["files"]["report"] == str(rep / "report.html")
    best = json.loads((out / "best.json").read_text())
    assert best["files"]["report"] == str(rep / "report.html")
    numbers = json.loads((rep / "report.json").read_text())
    # the report evaluates the final model on the test split tune scored it on
    assert numbers["images"] == result["test_images"] == 300
    assert numbers["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert numbers["tuning"]["best_params"] == best["best_params"] == result["best_params"]
    section = _section((rep / "report.html").read_text())
    assert _params_of(re.search(r'<table id="tuning-best">.*?</table>', section, re.S).group(0)) == best["best_params"]
    for key, name in numbers["files"].items():
        if key.startswith("tune_"):
            data = (rep / name).read_bytes()
            assert data.startswith(PNG_SIGNATURE) and data == (out / f"{key[5:]}.png").read_bytes()
    assert "tune_history" in numbers["files"]
    # the final model file records the test accuracy it was scored with (GET /models/{name} of imclass serve)
    from imclass.io import read_metadata

    assert read_metadata(out)["metrics"] == {"test_accuracy": result["test_accuracy"], "epochs": 1}


def test_report_needs_the_final_model_and_top_trials_keeps_ten(tmp_path):
    with pytest.raises(ValueError, match="a report evaluates the final model: drop --no-final"):
        TuneConfig(final=False, report=str(tmp_path / "r"))
    result = CliRunner().invoke(app, ["tune", "--no-final", "--report", str(tmp_path / "r"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "drop --no-final" in result.output
    assert not (tmp_path / "r").exists()
    # 12 trials: FAIL rows (no value) are skipped; ties keep the earlier trial first; 10 listed
    lines = ["number,state,val_accuracy,seconds,metric,k"]
    values = [0.5, 0.7, "", 0.7, 0.1, 0.9, 0.2, 0.3, 0.4, 0.6, 0.8, 0.05]
    for i, v in enumerate(values):
        lines.append(f"{i},{'FAIL' if v == '' else 'COMPLETE'},{v},1.5,l{1 + i % 2},{i + 1}")
    (tmp_path / "trials.csv").write_text("\n".join(lines) + "\n")
    top = _top_trials(tmp_path / "trials.csv", 10)
    assert top["listed"] == 12
    assert [t["number"] for t in top["top"]] == [5, 10, 1, 3, 9, 0, 8, 7, 6, 4]
    assert top["top"][0] == {"number": 5, "state": "COMPLETE", "val_accuracy": 0.9, "seconds": 1.5,
                             "params": {"metric": "l2", "k": 6}}
