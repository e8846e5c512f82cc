"""Conversion to base + routing adapter, loading it back, the CLI, and a short training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from subjective.model_registry import cli
from subjective.model_registry.convert import ADAPTER_FILE, convert, load_model, save_model
from subjective.model_registry.flops import count_flops
from subjective.model_registry.llama import is_base_parameter

VOCAB = 128
TEXT = (
    "The interpreter reads a line, compiles it and runs the byte code. "
    "A list keeps its items in order; a dict maps keys to values. "
) * 40


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB + 200,  # byte-level BPE may use up to 256 + merges ids
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("dense")
    HFLlama(config).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="subjective")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_convert_writes_base_reference_and_adapter(dense_folder: Path, tmp_path: Path, kind: str):
    dst = tmp_path / f"tiny-{kind}"
    assert (
        run_cli(
            ["model", "convert", "--to", kind, "--capacity", "0.25", str(dense_folder), str(dst)]
        )
        == 0
    )
    raw = json.loads((dst / "config.json").read_text())
    arch = {"sdt": "SubjectiveDepthForCausalLM", "stt": "SubjectiveTimescaleForCausalLM"}[kind]
    assert raw["architectures"] == [arch]
    assert raw["routing"]["kind"] == kind and raw["routing"]["capacity"] == 0.25
    assert raw["routing"]["gated_layers"] == [1, 3]
    assert set(raw["routing"]["quality_offsets"]) == {"aggressive", "conservative"}
    assert (dst / raw["base_model"]).resolve() == dense_folder.resolve()
    assert not (dst / "model.safetensors").exists()
    assert (dst / "tokenizer.json").is_file()
    adapter = load_file(dst / ADAPTER_FILE)
    assert adapter and not any(is_base_parameter(name) for name in adapter)
    assert all(
        ".router" in n or ".surprise." in n or ".prior" in n or ".transition" in n for n in adapter
    )
    # The base weights are the pretrained ones.
    model = load_model(dst)
    hf = HFLlama.from_pretrained(dense_folder)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_round_trip_keeps_outputs_and_routing(dense_folder: Path, tmp_path: Path, kind: str):
    convert(dense_folder, tmp_path / "a", kind)
    model = load_model(tmp_path / "a")
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapter: every adapter tensor changes
        for name, tensor in model.state_dict().items():
            if not is_base_parameter(name):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    for base in (dense_folder, None):  # adapter-only and full-weights checkpoints
        out_dir = tmp_path / ("adapter" if base else "full")
        save_model(model, out_dir, base_folder=base)
        loaded = load_model(out_dir)
        ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            a, b = model(ids), loaded(ids)
        assert torch.equal(a.logits, b.logits)
        assert a.routing.keys() == b.routing.keys() == {1, 3}
        for layer in a.routing:
            assert torch.equal(a.routing[layer], b.routing[layer])
        assert (out_dir / "model.safetensors").is_file() == (base is None)


def test_train_cli_resumes_and_freezes_base(dense_folder: Path, tmp_path: Path):
    convert(dense_folder, tmp_path / "sdt", "sdt")
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    common = [
        "train",
        str(tmp_path / "sdt"),
        "--data",
        str(text),
        "--validation",
        str(text),
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--lr",
        "1e-2",
        "--freeze-base",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--eval-blocks",
        "1",
        "--beta-start",
        "1",
        "--beta-end",
        "4",
    ]
    assert run_cli([*common, "--steps", "4", "--stop-after", "2"]) == 0
    assert run_cli([*common, "--steps", "4", "--resume"]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["lm"])) for h in history)
    assert {"val_lm", "val_lm_router", "prior_mse", "router_bce"} <= set(history[-1])
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "model" / "model.safetensors").exists()  # adapter only
    trained = load_model(out / "model")
    source = load_model(tmp_path / "sdt")
    for name, tensor in source.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor) == is_base_parameter(name), name
    assert float(trained.model.layers[0].surprise.beta_ce) > 1.0
    # Resuming reproduces an uninterrupted run exactly.
    straight = tmp_path / "straight"
    argv = [*common, "--steps", "4"]
    argv[argv.index(str(out))] = str(straight)
    assert run_cli(argv) == 0
    uninterrupted = load_model(straight / "model").state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(uninterrupted[name], tensor), name


def test_convert_chosen_layers(dense_folder: Path, tmp_path: Path) -> None:
    argv = ["model", "convert", "--to", "sdt", "--gated-layers", "3", str(dense_folder)]
    assert run_cli([*argv, str(tmp_path / "one")]) == 0
    routing = json.loads((tmp_path / "one" / "config.json").read_text())["routing"]
    assert routing["gated_layers"] == [3] and routing["decision_layers"] == [2]
    with torch.no_grad():
        out = load_model(tmp_path / "one")(torch.randint(0, VOCAB, (1, 9)))
    assert set(out.routing) == {3}
    with pytest.raises(ValueError):
        convert(dense_folder, tmp_path / "bad", "sdt", gated_layers=[1, 2])


def test_train_cli_full_weights_stt(dense_folder: Path, tmp_path: Path) -> None:
    convert(dense_folder, tmp_path / "stt", "stt")
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    argv = ["train", str(tmp_path / "stt"), "--data", str(text), "--output", str(out)]
    argv += ["--steps", "3", "--batch-size", "2", "--block-size", "24", "--lr", "1e-3"]
    assert run_cli(argv) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {"lm", "transition_mse", "router_bce", "gate_mean"} <= set(history[-1])
    assert (out / "model" / "model.safetensors").is_file()  # not frozen: full weights saved
    raw = json.loads((out / "model" / "config.json").read_text())
    assert "base_model" not in raw and raw["architectures"] == ["SubjectiveTimescaleForCausalLM"]
    trained, source = load_model(out / "model"), load_model(tmp_path / "stt")
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(trained.state_dict()[name], source.state_dict()[name])


def test_train_cli_adapter_lr_and_dense_baseline(dense_folder: Path, tmp_path: Path) -> None:
    """`--adapter-lr` moves only the routing adapter when the base rate is 0; a dense folder
    trains as the baseline fine-tuned on the same data."""
    convert(dense_folder, tmp_path / "sdt", "sdt")
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    short = ["--steps", "2", "--batch-size", "2", "--block-size", "24"]
    sdt_run = tmp_path / "sdt-run"
    argv = ["train", str(tmp_path / "sdt"), "--data", str(text), "--output", str(sdt_run)]
    assert run_cli([*argv, *short, "--lr", "0", "--adapter-lr", "1e-2"]) == 0
    source, trained = load_model(tmp_path / "sdt"), load_model(sdt_run / "model")
    changed = {
        name: not torch.equal(tensor, trained.state_dict()[name])
        for name, tensor in source.state_dict().items()
    }
    assert not any(moved for name, moved in changed.items() if is_base_parameter(name))
    assert any(moved for name, moved in changed.items() if not is_base_parameter(name))

    dense_run = tmp_path / "dense-run"
    argv = ["train", str(dense_folder), "--data", str(text), "--output", str(dense_run)]
    assert run_cli([*argv, *short, "--lr", "1e-3"]) == 0
    tuned = load_model(dense_run / "model")
    assert tuned.config.kind == "dense"
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], load_model(dense_folder).state_dict()[name])


def test_perplexity_evaluator_routes_gated_models_by_quality(
    dense_folder: Path, tmp_path: Path
) -> None:
    from subjective.evaluation.compute import load_metered

    convert(dense_folder, tmp_path / "sdt", "sdt")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    reference = load_model(tmp_path / "sdt").eval()
    scored, executed = {}, {}
    with torch.no_grad():
        for quality in ("aggressive", "conservative", None):
            threshold = reference.config.routing.threshold_for(quality)
            expected = reference(ids, threshold=threshold, logits="all")
            logits_fn, totals = load_metered(tmp_path / "sdt", quality=quality)
            scored[quality] = logits_fn(ids)
            assert torch.equal(scored[quality], expected.logits), quality
            lengths = torch.full((2,), 24)
            report = count_flops(
                reference.config, expected.routing, lengths, lengths, prompt_logits="all"
            )
            assert totals.counts["flops"] == int(report.prompt.flops.sum())
            executed[quality] = totals.summary()
        dense_fn, dense_totals = load_metered(dense_folder)
        assert dense_fn(ids).shape == expected.logits.shape
        assert dense_totals.summary()["total_flop_reduction"] == 0.0
    assert not torch.equal(scored["aggressive"], scored["conservative"])
    # The higher (aggressive) threshold keeps fewer KV entries in the gated layers.
    kv_saved = {q: executed[q]["kv_reduction_gated"] for q in ("aggressive", "conservative")}
    assert kv_saved["aggressive"] > kv_saved["conservative"]


def test_train_cli_distils_from_the_dense_teacher(dense_folder: Path, tmp_path: Path) -> None:
    """A copy of the teacher starts at KL 0; a converted model starts away from it."""
    convert(dense_folder, tmp_path / "sdt", "sdt")
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    short = ["--steps", "2", "--batch-size", "2", "--block-size", "24", "--lr", "1e-3"]
    first_kl = {}
    for name, student in (("dense", dense_folder), ("sdt", tmp_path / "sdt")):
        out = tmp_path / f"{name}-run"
        argv = ["train", str(student), "--data", str(text), "--output", str(out)]
        assert run_cli([*argv, *short, "--teacher", str(dense_folder)]) == 0
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        first_kl[name] = history[0]["distill_kl"]
    assert abs(first_kl["dense"]) < 1e-6, first_kl
    assert first_kl["sdt"] > 1e-4, first_kl


def test_install_adapter_serves_the_shipped_routing(dense_folder: Path, tmp_path: Path) -> None:
    """A shipped adapter (config + adapter weights, no base) over the dense folder loads back
    to the very model it was saved from."""

    trained = convert(dense_folder, tmp_path / "sdt", "sdt", seed=3)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    raw = json.loads((trained / "config.json").read_text())
    raw.pop("base_model")
    (shipped / "config.json").write_text(json.dumps(raw))
    (shipped / ADAPTER_FILE).write_bytes((trained / ADAPTER_FILE).read_bytes())
    argv = ["model", "install-adapter", str(shipped), "--base", str(dense_folder)]
    assert run_cli([*argv, "--output", str(tmp_path / "served")]) == 0
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = load_model(trained)(ids)
        got = load_model(tmp_path / "served")(ids)
    assert torch.equal(got.logits, expected.logits)
    assert (tmp_path / "served" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="no SDT/STT routing adapter"):
        run_cli(["model", "install-adapter", str(dense_folder), "--output", str(tmp_path / "x")])


def test_eval_ppl_on_a_text_file_reports_compute(dense_folder: Path, tmp_path: Path) -> None:
    from subjective.cli import main

    convert(dense_folder, tmp_path / "stt", "stt")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    records = {}
    for threshold in ("0", "1"):
        out = tmp_path / f"eval-{threshold}.json"
        argv = ["eval", "ppl", str(tmp_path / "stt"), "--text", str(text), "--block-size", "32"]
        assert main([*argv, "--threshold", threshold, "--json", str(out)]) == 0
        records[threshold] = json.loads(out.read_text())
    kept, skipped = records["0"], records["1"]
    for field in ("perplexity", "tokens", "flops", "dense_flops", "dyn_attn_flop_reduction",
                  "kv_reduction_gated", "kv_reduction_total"):  # fmt: skip
        assert field in kept, field
    assert kept["kv_reduction_gated"] == 0.0 and kept["dyn_attn_flop_reduction"] == 0.0
    # Threshold 1: only the 4 sink positions of each 32-token block run the gated layers.
    assert skipped["kv_reduction_gated"] == pytest.approx(1 - 4 / 32)
    assert skipped["kv_reduction_total"] == pytest.approx((1 - 4 / 32) * 2 / 4)
    assert skipped["flops"] < kept["flops"] and kept["dense_flops"] == skipped["dense_flops"]
    with pytest.raises(SystemExit, match="no such file"):
        main(["eval", "ppl", str(tmp_path / "stt"), "--text", str(tmp_path / "missing.txt")])


def test_fit_skip_cli_rewrites_the_adapter_in_place(dense_folder: Path, tmp_path: Path) -> None:
    """Stage A from the command line: new priors and routers, the base still referenced, the
    fits recorded; a dense folder is refused."""
    folder = convert(dense_folder, tmp_path / "sdt", "sdt")
    before = load_file(folder / ADAPTER_FILE)
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    argv = ["model", "fit-skip", str(folder), "--data", str(text), "--blocks", "4"]
    assert run_cli([*argv, "--block-size", "32", "--steps", "5"]) == 0
    after = load_file(folder / ADAPTER_FILE)
    assert set(after) == set(before)
    changed = [n for n in after if "prior." in n and not torch.equal(after[n], before[n])]
    assert changed
    assert not (folder / "model.safetensors").exists()
    fits = json.loads((folder / "stage_a.json").read_text())
    assert [f["layer"] for f in fits] == load_model(folder).config.routing.gated_layers
    with pytest.raises(SystemExit, match="is dense"):
        run_cli(["model", "fit-skip", str(dense_folder), "--data", str(text)])
