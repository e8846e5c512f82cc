"""KL-guided hybrid distillation at tiny scale: stage 1 aligns, the ranking finds a planted
important layer, and the CLI pipeline (stage 1 → rank → build → stage 2 → eval ppl) runs
end to end, resuming where a stopped run left off."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subjective.cli import main as cli_main
from subjective.model_registry.convert import build_model, load_model, save_model
from subjective.model_registry.distil import (
    Plan,
    alignment_loss,
    assemble,
    distil,
    held_out_kl,
    logits_of,
)
from subjective.model_registry.hybrid_rank import keep_count, rank_layers_by_kl, select_layers
from subjective.model_registry.tiny import tiny_config

PLANTED = 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, most of all on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_teacher() -> torch.nn.Module:
    """A tiny dense model whose layer `PLANTED` attention writes a large update: whatever a
    linear attention puts in its place, the error there dominates the output."""
    torch.manual_seed(0)
    teacher = build_model(tiny_config(layers=4)).eval()
    with torch.no_grad():
        teacher.model.layers[PLANTED].self_attn.o_proj.weight.mul_(30.0)
    return teacher


def test_stage1_aligns_and_the_ranking_puts_the_planted_layer_first() -> None:
    teacher = planted_teacher()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 101, (4000,), generator=generator, dtype=torch.int32)
    held_out = torch.randint(0, 101, (4, 48), generator=generator)
    student = assemble(teacher, [])
    with torch.no_grad():
        before = float(alignment_loss(teacher, student, held_out))
    plan = Plan(stage=1, steps=30, batch_size=4, block_size=48, lr_attention=3e-3)
    history = distil(teacher, student, tokens, plan, progress=False)
    assert len(history) == 30
    with torch.no_grad():
        after = float(alignment_loss(teacher, student, held_out))
    assert after < 0.7 * before, (before, after)
    # Only the linear attentions trained in stage 1.
    for name, param in student.named_parameters():
        if ".self_attn." not in name:
            assert torch.equal(param, teacher.get_parameter(name)), name

    rank_plan = replace(plan, stage=2, steps=3, lr_attention=1e-3, lr_rest=1e-4)
    scores = rank_layers_by_kl(teacher, student, tokens, held_out, rank_plan, progress=False)
    assert sorted(s.layer for s in scores) == [0, 1, 2, 3]
    assert scores[0].layer == PLANTED, scores
    assert max(scores, key=lambda s: s.proxy_kl).layer == PLANTED, scores
    # The score is the KL the restored hybrid reaches, measured as `held_out_kl` does.
    reference = logits_of(teacher, held_out)
    assert held_out_kl(reference, teacher, held_out) == pytest.approx(0.0, abs=1e-6)


def test_layer_selection() -> None:
    assert select_layers("uniform", 8, 32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert select_layers("uniform", 8, 30) == [2, 6, 10, 14, 17, 21, 25, 29]
    assert select_layers("uniform", 15, 30) == list(range(1, 30, 2))
    assert select_layers("kl", 2, 4, [2, 0, 3, 1]) == [0, 2]
    with pytest.raises(ValueError, match="order all"):
        select_layers("kl", 2, 4, [2, 0])
    assert keep_count(0.25, 30) == 8 and keep_count(3, 30) == 3
    for bad in (0.0, 31, 2.5):
        with pytest.raises(ValueError):
            keep_count(bad, 30)


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory, model_dir: Path) -> Path:
    """A tiny random dense Llama with SmolLM2's tokenizer (its vocabulary size)."""
    torch.manual_seed(3)
    config = replace(tiny_config(layers=4), vocab_size=49152)
    folder = tmp_path_factory.mktemp("dense")
    template = json.loads((model_dir / "config.json").read_text())
    return save_model(
        build_model(config), folder, base_folder=None, template_config=template,
        tokenizer_from=model_dir,
    )  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, data_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    with (data_dir / "train.txt").open(encoding="utf-8") as handle:
        path.write_text(handle.read(30_000), encoding="utf-8")
    return path


def run(*argv: object) -> None:
    assert cli_main([str(a) for a in argv]) == 0


def test_pipeline_end_to_end_through_the_cli(dense_folder: Path, text_file: Path, tmp_path):
    common = ["--data", text_file, "--batch-size", 2, "--block-size", 64, "--threads", 1]
    stage1 = tmp_path / "stage1"
    stage1_args = ["hybrid", "distil", dense_folder, "--stage", 1, *common, "--steps", 6]
    run(*stage1_args, "--output", stage1, "--stop-after", 4, "--save-every", 100)
    state = torch.load(stage1 / "state.pt", weights_only=False)
    assert state["step"] == 4
    run(*stage1_args, "--output", stage1, "--resume")
    straight = tmp_path / "straight"
    run(*stage1_args, "--output", straight)
    resumed = load_file(stage1 / "model" / "model.safetensors")
    uninterrupted = load_file(straight / "model" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6)
    losses = [json.loads(line)["loss"] for line in (stage1 / "history.jsonl").open()]
    assert len(losses) == 6 and (stage1 / "loss.png").stat().st_size > 0
    config = json.loads((stage1 / "model" / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention"] * 4

    run("hybrid", "rank", stage1, *common, "--steps", 2, "--eval-blocks", 2)
    ranking = json.loads((stage1 / "hybrid_ranking.json").read_text())
    assert sorted(ranking["ranking"]) == [0, 1, 2, 3]
    assert [entry["layer"] for entry in ranking["layers"]] == ranking["ranking"]
    assert (stage1 / "hybrid_ranking.png").stat().st_size > 0
    # An interrupted ranking resumes: scored layers are kept (a planted score shows it), the
    # others rerun on the same data order and seed, so they reach the same KL.
    planted = {**ranking["layers"][-1], "kl": -1.0}
    setting = {"plan": ranking["plan"], "eval_blocks": 2, "data": str(text_file)}
    (stage1 / "hybrid_ranking.partial.jsonl").write_text(
        json.dumps({"setting": setting, "score": planted}) + "\n"
    )
    run("hybrid", "rank", stage1, *common, "--steps", 2, "--eval-blocks", 2, "--resume")
    first, ranking = ranking, json.loads((stage1 / "hybrid_ranking.json").read_text())
    assert ranking["layers"][0] == planted
    assert ranking["layers"][1:] == first["layers"][:-1]
    assert not (stage1 / "hybrid_ranking.partial.jsonl").exists()

    built = {}
    for select in ("kl", "uniform"):
        built[select] = tmp_path / f"hybrid-{select}"
        run("hybrid", "build", stage1, "--keep", 0.5, "--select", select, "--output", built[select])
    for select, softmax in (("kl", sorted(ranking["ranking"][:2])), ("uniform", [1, 3])):
        config = json.loads((built[select] / "config.json").read_text())
        assert config["architectures"] == ["SubjectiveHybridForCausalLM"]
        types = ["full_attention" if i in softmax else "linear_attention" for i in range(4)]
        assert config["layer_types"] == types
    # The build takes its linear layers from stage 1 and its softmax layers from the teacher.
    hybrid, student = load_model(built["kl"]), load_model(stage1 / "model")
    teacher = load_model(dense_folder)
    for i, layer in enumerate(hybrid.model.layers):
        source = teacher if i in ranking["ranking"][:2] else student
        for name, param in layer.self_attn.named_parameters():
            assert torch.equal(param, source.model.layers[i].self_attn.get_parameter(name))

    stage2 = tmp_path / "stage2"
    run(
        "hybrid", "distil", dense_folder, "--stage", 2, "--student", built["kl"], *common,
        "--steps", 3, "--output", stage2,
    )  # fmt: skip
    trained = load_model(stage2 / "model")
    assert trained.config.layer_types == hybrid.config.layer_types
    changed = [
        name
        for name, param in trained.named_parameters()
        if not torch.equal(param, hybrid.get_parameter(name))
    ]
    assert any("mlp" in name for name in changed), "stage 2 trains every parameter"
    assert any(".self_attn.g_proj" in name for name in changed)

    result = tmp_path / "ppl.json"
    run(
        "eval", "ppl", stage2 / "model", "--text", text_file, "--block-size", 64,
        "--max-tokens", 256, "--json", result,
    )  # fmt: skip
    record = json.loads(result.read_text())
    assert record["tokens"] == 4 * 63 and 1.0 < record["perplexity"] < math.inf
    assert record["kv_reduction_total"] == pytest.approx(0.5)
