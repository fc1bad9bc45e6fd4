"""Training: class-balanced batches, a short real run that must learn, resuming, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_metric_learning", reason="the train extra is not installed")

from model.calibration import calibrate, objective
from model.checkpoint import load_checkpoint
from model.config import ModelConfig, Preprocessing
from model.datasets import read_dataset
from model.loading import embed_records
from model.sampling import ClassBalancedBatches, SamplingError
from model.training import TrainConfig, Trainer, TrainingError
from service.cli import build_parser, main

SMALL = Preprocessing(resize=128, crop=112)
CONFIG = ModelConfig(backbone="mobilenet_v2", dim=32, grid=2, preprocessing=SMALL)


def test_class_balanced_batches() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 3 + [3] * 7)
    sampler = ClassBalancedBatches(labels, batch_size=6, per_class=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(labels) // 6
    for batch in batches:
        assert len(batch) == 6
        assert len(set(batch)) == 6
        counts = torch.bincount(labels[batch], minlength=4)
        assert sorted(counts.tolist()) == [0, 2, 2, 2]
    again = ClassBalancedBatches(labels, batch_size=6, per_class=2, seed=1)
    assert list(again) == batches
    # Over many batches every image is drawn (the per-class queues cycle).
    many = ClassBalancedBatches(labels, 6, 2, seed=2, batches_per_epoch=40)
    assert {i for b in many for i in b} == set(range(len(labels)))


def test_classes_with_one_image_are_left_out() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    batches = ClassBalancedBatches(labels, 4, 2, batches_per_epoch=20)
    assert 6 not in {i for b in batches for i in b}


def test_a_batch_needs_two_classes() -> None:
    with pytest.raises(SamplingError, match="two classes"):
        ClassBalancedBatches(torch.tensor([0, 0, 0, 1]), 4, 2)
    with pytest.raises(TrainingError, match="at least two classes"):
        TrainConfig(batch_size=4, per_class=4)


@pytest.mark.slow
def test_tail_training_learns_selects_on_validation_resumes_and_feeds_evaluate(
    cub_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = read_dataset(cub_dev, "cub", "1-4")
    val = read_dataset(cub_dev, "cub", "5-6")
    config = TrainConfig(
        loss="ms-diml", epochs=2, batch_size=32, per_class=4, views=1, batches_per_epoch=8,
        rerank_k=20, train="tail",
    )  # fmt: skip
    assert config.head_init == "pca"
    out = tmp_path / "run"
    trainer = Trainer(CONFIG, config, train, val, out, torch.device("cpu"), progress=False)
    body = trainer.model.backbone.body
    first_before = next(body[0].parameters()).detach().clone()
    last_before = next(body[-1].parameters()).detach().clone()
    trainer.fit()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1, 2]
    assert log[0]["start"]
    assert log[0]["selected"]  # the start is the first best
    assert log[2]["loss"] < log[1]["loss"]  # it learns
    assert set(log[1]["val"]) == {"global", "reranked", "structural_weight", "score_bands"}
    assert torch.equal(next(body[0].parameters()), first_before)  # the prefix is frozen
    assert not torch.equal(next(body[-1].parameters()), last_before)  # the last stage trains

    # best.safetensors is the best evaluation of the log, with its calibrated weight.
    chosen = [e for e in log if e["selected"]][-1]
    best = load_checkpoint(out / "best.safetensors")
    assert best.config.matching.structural_weight == chosen["val"]["structural_weight"]
    bands = (best.config.matching.related_score, best.config.matching.close_score)
    assert list(bands) == chosen["val"]["score_bands"]  # the verdict's bands travel with it
    assert best.config.dim == (None if chosen.get("start") else CONFIG.dim)
    embedding, _ = embed_records(best, val.records, torch.device("cpu"))
    again = calibrate(embedding, val.labels, 20, best.config.matching)
    value = objective(again.best)
    assert value == pytest.approx(max(objective(e["val"]["reranked"]) for e in log), abs=0.5)
    assert value >= objective(log[0]["val"]["reranked"]) - 0.5  # never worse than the start
    # Resume to a third epoch: the log goes on, the state carries over.
    resumed = Trainer(
        CONFIG, TrainConfig(**{**config.__dict__, "epochs": 3}), train, val, out,
        torch.device("cpu"), resume=True, progress=False,
    )  # fmt: skip
    assert resumed.epoch == 2
    resumed.fit()
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    # Other settings cannot resume the run, and a new run will not overwrite it.
    with pytest.raises(TrainingError, match="other settings"):
        Trainer(
            CONFIG, TrainConfig(**{**config.__dict__, "head_lr": 0.5}), train, val, out,
            torch.device("cpu"), resume=True, progress=False,
        )  # fmt: skip
    with pytest.raises(TrainingError, match="already holds a run"):
        Trainer(CONFIG, config, train, val, out, torch.device("cpu"), progress=False)

    # The checkpoint is what the other commands take.
    report = tmp_path / "eval.json"
    code = main(
        ["evaluate", "--data", str(cub_dev), "--classes", "7-8", "--rerank-k", "10",
         "--checkpoint", str(out / "best.safetensors"), "--json", str(report)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["grid"] == 2
    pair = [str(r.path) for r in val.records[:2]]
    best_file = str(out / "best.safetensors")
    capsys.readouterr()
    assert main(["explain", *pair, "--checkpoint", best_file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["grid"] == 2
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in pair:
        (photos / Path(path).name).write_bytes(Path(path).read_bytes())
    index = ["index", "build", "--images", str(photos), "--out", str(tmp_path / "index")]
    assert main([*index, "--checkpoint", best_file, "--quiet"]) == 0


@pytest.mark.slow
def test_fine_tuning_the_whole_network_with_augmentations(cub_dev: Path, tmp_path: Path) -> None:
    tiny = ModelConfig(backbone="mobilenet_v2", dim=16, grid=2, preprocessing=Preprocessing(72, 64))
    train = read_dataset(cub_dev, "cub", "1-2")
    val = read_dataset(cub_dev, "cub", "3")
    config = TrainConfig(
        loss="margin-diml", epochs=1, batch_size=8, per_class=4, batches_per_epoch=2, train="all"
    )
    trainer = Trainer(
        tiny, config, train, val, tmp_path / "run", torch.device("cpu"), progress=False
    )
    before = next(trainer.model.backbone.parameters()).detach().clone()
    entry = trainer.fit()
    assert entry["epoch"] == 1
    assert not torch.equal(next(trainer.model.backbone.parameters()), before)


def test_the_default_recipe_trains_the_whole_network_with_a_512_d_head() -> None:
    # The dimension chosen on the validation classes (docs/measured.md); the rest of the
    # default recipe is TrainConfig's.
    base = ["train", "--data", "d", "--classes", "1-15", "--val-classes", "16-20", "--out", "o"]
    args = build_parser().parse_args(base)
    assert args.dim == 512
    assert (args.train, args.head_init, args.loss) == ("all", "pca", "ms-diml")
    assert build_parser().parse_args([*base, "--dim", "128"]).dim == 128


def test_each_recipe_has_its_own_number_of_epochs_unless_one_is_given() -> None:
    assert TrainConfig().epochs == 30  # the whole network
    assert TrainConfig(train="tail").epochs == TrainConfig(train="head").epochs == 20
    assert TrainConfig(train="tail", epochs=3).epochs == 3
    with pytest.raises(TrainingError, match="--epochs"):
        TrainConfig(epochs=-1)


def test_cli_refuses_overlapping_classes_and_names_bad_files(
    cub_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(cub_dev), "--classes", "1-3", "--out", str(tmp_path / "r")]
    assert main([*args, "--val-classes", "3-4"]) == 2
    assert "share classes [3]" in capsys.readouterr().err
    (tmp_path / "images.txt").write_text("1 a.jpg\n")
    bad = ["train", "--data", str(tmp_path), "--dataset", "cub", "--classes", "1"]
    assert main([*bad, "--val-classes", "2", "--out", str(tmp_path / "r")]) == 2
    assert "image_class_labels.txt: missing" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_that_never_beats_the_start_keeps_the_start(
    cub_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A head-only run with a random head and an absurd learning rate cannot beat the backbone's
    # own features; the CLI says so and best.safetensors is the head-less start.
    out = tmp_path / "run"
    args = [
        "train", "--data", str(cub_dev), "--classes", "1-3", "--val-classes", "4-5",
        "--out", str(out), "--freeze-backbone", "--head-init", "random", "--head-lr", "50",
        "--epochs", "1", "--batch-size", "16", "--views", "0", "--dim", "8", "--grid", "2",
        "--rerank-k", "10", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "no epoch beat the starting model" in printed
    best = load_checkpoint(out / "best.safetensors")
    assert best.config.dim is None
    assert best.config.grid == 2


def test_mixed_precision_is_bfloat16_only_on_a_cpu_that_has_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model.devices import autocast_dtype

    assert autocast_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast_dtype(torch.device("cpu")) is None
    with pytest.raises(TrainingError, match="--precision"):
        TrainConfig(precision="half")


@pytest.mark.parametrize(("precision", "expected"), [("mixed", torch.bfloat16), ("fp32", None)])
def test_a_training_step_runs_the_backbone_in_the_chosen_precision(
    cub_dev: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    expected: torch.dtype | None,
) -> None:
    import model.training

    monkeypatch.setattr(model.training, "autocast_dtype", lambda device: torch.bfloat16)
    tiny = ModelConfig(backbone="mobilenet_v2", dim=16, grid=2, preprocessing=Preprocessing(72, 64))
    train, val = read_dataset(cub_dev, "cub", "1-2"), read_dataset(cub_dev, "cub", "3")
    config = TrainConfig(
        epochs=1, batch_size=8, per_class=4, batches_per_epoch=1, train="all", precision=precision
    )
    trainer = Trainer(tiny, config, train, val, tmp_path / "r", torch.device("cpu"), progress=False)
    seen: list[torch.dtype] = []
    conv = trainer.model.head.proj
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer._step(torch.rand(8, 3, 64, 64), train.labels[:8])
    assert seen == [expected or torch.float32]
    assert trainer.scaler.is_enabled() is False  # bfloat16 needs no gradient scaling
