"""Every training option is checked before any model is loaded, with one-line errors; resuming with changed
options or data is refused naming the difference; `qembed train --help` shows every default."""

import argparse
import json
import shutil

import pytest

from qembed.cli import build_parser, main
from qembed.cli.train import config_from_args
from qembed.errors import QembedError
from qembed.train.config import TrainConfig
from qembed.train.embedder import train_embedder
from qembed.train.reranker import train_reranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg-data") / "train.jsonl"
    topics = ["rice", "maize", "wheat", "soybean", "potato", "tomato", "cotton", "barley"]
    path.write_text("".join(json.dumps({"query": f"{t} disease", "pos": [f"{t} disease control"],
                                        "neg": [f"{t} recipes"]}) + "\n" for t in topics))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def test_only_beir(tmp_path_factory):
    from qembed.data.beir import write_beir

    path = tmp_path_factory.mktemp("cfg-beir")
    write_beir(path, {"d0": {"text": "rice disease control"}}, {"q0": "rice disease"}, {"test": {"q0": {"d0": 1}}})
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    from qembed import Embedder, Reranker

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(Embedder, "from_pretrained", refuse)
    monkeypatch.setattr(Reranker, "from_pretrained", refuse)


EMBEDDER_ERRORS = [
    (dict(fn_margin=-0.1), "--fn-margin must not be negative"),
    (dict(eval_metric="ndcg@7"), "unknown --eval-metric 'ndcg@7'"),
    (dict(mrl_dims=[16, 64]), "--mrl-dims must be at least 32"),
    (dict(mrl_dims=[32, 128]), "--mrl-dims 128 exceeds the model's hidden size 64"),
    (dict(load_best=True), "--load-best needs --eval-dataset"),
    (dict(eval_steps=5), "--eval-steps needs --eval-dataset"),
    (dict(lora=True, lora_targets=["q_proj", "qkv"]), "--lora-targets qkv: no such module"),
    (dict(lora=False, lora_targets=["q_proj"]), "--lora-targets needs LoRA"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(temperature=0.0), "--temperature must be positive"),
    (dict(data=["missing.jsonl"]), "training data file not found"),
    (dict(eval_dataset="TEST_ONLY"), "no dev split and no train split"),
]


@pytest.mark.parametrize("change,message", EMBEDDER_ERRORS, ids=[m for _, m in EMBEDDER_ERRORS])
def test_embedder_options_checked_before_loading(change, message, tiny_embedder_path, data_file, test_only_beir,
                                                 tmp_path, no_model_load):  # fmt: skip
    change = {k: str(test_only_beir) if v == "TEST_ONLY" else v for k, v in change.items()}
    kw = dict(model=str(tiny_embedder_path), data=[str(data_file)], output=str(tmp_path / "o"))
    cfg = TrainConfig(**{**kw, **change})
    with pytest.raises(QembedError, match=message):
        train_embedder(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change,message", [
    (dict(eval_metric="ndcg@100"), "unknown --eval-metric"),  # the reranker evaluates @1, 5, 10
    (dict(mrl_dims=[32]), "embedder training only"),
    (dict(lora=True, lora_targets=["query"]), "--lora-targets query: no such module"),
])  # fmt: skip
def test_reranker_options_checked_before_loading(change, message, tiny_reranker_path, data_file, tmp_path,
                                                 no_model_load):  # fmt: skip
    cfg = TrainConfig(model=str(tiny_reranker_path), data=[str(data_file)], output=str(tmp_path / "o"), **change)
    with pytest.raises(QembedError, match=message):
        train_reranker(cfg)


def test_cli_margin_negative_is_one_line_error_and_off_disables(tiny_embedder_path, data_file, tmp_path, capsys,
                                                                no_model_load):  # fmt: skip
    base = ["train", "embedder", "--model", str(tiny_embedder_path), "--data", str(data_file), "--output",
            str(tmp_path / "o")]  # fmt: skip
    assert main(base + ["--fn-margin", "-0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fn-margin must not be negative" in err
    assert config_from_args(build_parser().parse_args(base + ["--fn-margin", "off"])).fn_margin is None
    assert config_from_args(build_parser().parse_args(base)).fn_margin == TrainConfig.fn_margin == 0.1


def test_resume_refuses_changed_options_and_data(tiny_embedder_path, data_file, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(data_file, data)
    out = tmp_path / "out"
    base = ["train", "embedder", "--model", str(tiny_embedder_path), "--data", str(data), "--output", str(out),
            "--batch-size", "4", "--max-steps", "2", "--save-steps", "1", "--lr", "1e-3"]  # fmt: skip
    assert main(base) == 0
    assert (out / "checkpoints" / "step-1").is_dir()
    capsys.readouterr()
    for extra, named in [(["--lora"], "--lora/--full is True but the checkpoints were trained with False"),
                         (["--batch-size", "2"], "--batch-size is 2 but the checkpoints were trained with 4"),
                         (["--fn-margin", "off"], "--fn-margin is None"),
                         ([], "--resume")]:  # fmt: skip
        assert main(base + extra + (["--resume"] if extra else [])) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    with data.open("a") as f:
        f.write(json.dumps({"query": "oat disease", "pos": ["oat disease control"]}) + "\n")
    assert main(base + ["--resume"]) == 2
    assert "train.jsonl changed since the checkpoints were written" in capsys.readouterr().err
    data.write_text(data_file.read_text())
    # options that do not change the training trajectory may change
    assert main(base + ["--resume", "--save-steps", "5", "--save-total-limit", "1"]) == 0
    # without the run's recorded options (an older run), the checkpoint itself does not fit a LoRA model
    (out / "train_config.json").unlink()
    capsys.readouterr()
    assert main(base + ["--lora", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not fit this model" in err, err


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_names_every_default():
    verbs = _subparsers(build_parser())
    train = _subparsers(verbs["train"])
    for name in ("embedder", "reranker"):
        parser = train[name]
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, action.option_strings
            if not action.required and action.nargs != 0:
                assert "default" in formatter._get_help_string(action), action.option_strings
        assert "GRAD_CACHE_CHUNK" not in parser.format_help()
        assert parser.get_default("num_negatives") == verbs["mine"].get_default("num_negatives")
        assert parser.get_default("eval_split") == "dev"
