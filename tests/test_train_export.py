"""Trained models people can use: the Hugging Face export of a run, from ZeRO 2 and ZeRO 3.

Two real 2-rank runs (deepspeed launcher, CPU, tiny GPT-2, MERIT, fp32, 4 steps, checkpoints at
2 and 4) on a prepared data set. References, each independent of the export path:

- the training engine's own logits on the probe batch (computed inside the training processes
  from the live DeepSpeed model, recorded as a sha256): the exported directory, loaded here
  with ``AutoModelForCausalLM.from_pretrained``, gives bitwise the same logits;
- the training loss logged at step 3 is the loss of the weights after step 2 on step 3's
  batch: ``merit-ds export --step 2`` reproduces it from the sampler's batch to 1e-5;
- ``pipeline("text-generation")``'s greedy continuation equals a hand-written argmax loop.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _dist import REPO_ROOT, dist_env, free_port
from merit_ds.data import TokenBlockLoader, load_tokenizer, prepare, read_manifest

WORDS = "the of and to in that he shall unto for his a they be is him not them it with all".split()
ARGS = ["--model", "tiny", "--model-override", "n_layer=2", "--model-override", "n_embd=32",
        "--model-override", "n_head=2", "--seq-len", "32", "--global-batch", "4", "--micro-batch", "1",
        "--precision", "fp32", "--eval-every", "2", "--ckpt-every", "2", "--keep-last", "3", "--diag-every", "0",
        "--tracker", "none", "--no-progress", "--no-plot", "--steps", "4", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("export_data")
    src = d / "c.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60))))}) + "\n"
                           for _ in range(120)))
    prepare(src, d / "prepared", val_fraction=0.25, shard_tokens=1000, progress=False)
    return d / "prepared"


_runs = {}


def trained(data, stage: int, tmp_path_factory) -> Path:
    if stage not in _runs:
        out = tmp_path_factory.mktemp(f"export_z{stage}") / "run"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "merit_ds.train", *ARGS, "--zero-stage", str(stage), "--data", str(data), "--out", str(out)]
        r = subprocess.run(cmd, env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"exported: {out / 'hf_model'}" in r.stdout
        _runs[stage] = out
    return _runs[stage]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def load(d: Path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # the training ranks ran on one thread each: same summation order
    return AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()


def logits_sha(model, ids) -> str:
    with torch.no_grad():
        return hashlib.sha256(model(input_ids=ids).logits.float().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.slow  # trains with the deepspeed launcher
@pytest.mark.parametrize("stage", [2, 3])
def test_end_of_training_export_has_the_engines_logits(data, stage, tmp_path_factory):
    run = trained(data, stage, tmp_path_factory)
    d = run / "hf_model"
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "README.md", "merit_ds_export.json"):
        assert (d / f).is_file(), f
    meta = json.loads((d / "merit_ds_export.json").read_text())
    assert meta["step"] == 4 and meta["tokens"] == 4 * 4 * 32
    assert meta["consolidation"] == "deepspeed.utils.zero_to_fp32"
    probe = meta["probe"]
    assert probe["shape"] == [2, 32] and probe["max_abs_diff"] == 0.0
    ids = torch.tensor(probe["input_ids"])
    # the probe is the first 64 validation tokens of the prepared data
    val0 = np.fromfile(data / "val_000000.bin", dtype="<u2")[:64].astype(np.int64)
    assert ids.view(-1).tolist() == val0.tolist()
    assert logits_sha(load(d), ids) == probe["engine_logits_sha256"]
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_positions"], cfg["vocab_size"]) == (2, 32, 2, 32, 50304)
    card = (d / "README.md").read_text()
    final_val = [r["val_loss"] for r in metrics(run) if "val_loss" in r][-1]
    assert f"| validation loss | {final_val:.4f} " in card
    assert f"DeepSpeed ZeRO {stage}, fp32" in card and "| optimizer | MERIT: peak lr" in card
    assert "| tokens | 512 (4 steps) |" in card
    assert "4 sequences x 32 tokens = 128 tokens per step (micro-batch 1 x grad-accum 2 x 2 ranks)" in card
    m = read_manifest(data)["splits"]
    assert f"`{data.resolve()}` (" in card
    assert f"{m['train']['tokens']:,} train / {m['val']['tokens']:,} validation tokens" in card


@pytest.mark.slow  # training run + export processes
@pytest.mark.parametrize("stage", [2, 3])
def test_cli_export_of_an_earlier_step_reproduces_the_logged_loss(data, stage, tmp_path_factory, tmp_path):
    run = trained(data, stage, tmp_path_factory)
    out = tmp_path / "step2"
    r = subprocess.run([sys.executable, "-m", "merit_ds", "export", "--run", str(run), "--step", "2", "--out", str(out)],
                       env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((out / "merit_ds_export.json").read_text())["step"] == 2
    model = load(out)
    # step 3's global batch, from the same sampler the run used (seed 7, shuffled), on one "rank"
    loader = TokenBlockLoader(data, block_size=32, global_batch=4, micro_batch=4, seed=7, shuffle=True)
    x, y = loader.get_batch(2)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.view(-1, model.config.vocab_size), y.reshape(-1)).item()
    logged = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert loss == pytest.approx(logged[3], rel=1e-5)
    assert abs(loss - logged[2]) > 1e-4  # and it is not the step-1 weights' loss: the test has teeth
    card = (out / "README.md").read_text()
    val2 = next(r["val_loss"] for r in metrics(run) if r.get("step") == 2 and "val_loss" in r)
    assert f"| validation loss | {val2:.4f} " in card and "at step 2 |" in card and "| tokens | 256 (2 steps) |" in card
    # the latest checkpoint through the CLI: the same weights as the end-of-training export
    latest = tmp_path / "latest"
    r = subprocess.run([sys.executable, "-m", "merit_ds", "export", "--run", str(run), "--out", str(latest)],
                       env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(str(latest / "model.safetensors")), load_file(str(run / "hf_model" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # needs the launched training run
def test_pipeline_generates_the_greedy_continuation(data, tmp_path_factory):
    from transformers import AutoTokenizer, pipeline

    d = trained(data, 2, tmp_path_factory) / "hf_model"
    gen = pipeline("text-generation", model=str(d), device="cpu")
    prompt = "he shall be"
    text = gen(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    tok = AutoTokenizer.from_pretrained(str(d))
    model = load(d)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == load_tokenizer()(prompt)["input_ids"]  # GPT-2's BPE, loaded the package's way
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == tok.decode(ids[0])


@pytest.mark.slow  # training run + export processes
def test_export_errors_name_what_is_missing(data, tmp_path_factory, tmp_path):
    run = trained(data, 2, tmp_path_factory)
    r = subprocess.run([sys.executable, "-m", "merit_ds", "export", "--run", str(run), "--step", "3", "--out",
                        str(tmp_path / "x")], env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "has no checkpoint of step 3 (has: step_00000002, step_00000004)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "merit_ds", "export", "--run", str(tmp_path), "--out", str(tmp_path / "x")],
                       env=dist_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "has no checkpoint" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_reduced_vocabulary_run_is_not_exported_with_gpt2s_tokenizer():
    """A model whose vocabulary is smaller than the data's tokenizer (a study cell's 2,048
    remapped ids) is refused before anything is written; GPT-2's padded 50,304 passes."""
    from merit_ds.train import export

    with pytest.raises(export.ExportError, match="has 50257 tokens, the model 2048.*nothing was written"):
        export._tokenizer({"tokenizer": {"name": "gpt2"}}, 2048)
    tok, name, tok_dir = export._tokenizer({}, 50304)  # nanoGPT .bin data: GPT-2 assumed
    assert (len(tok), name) == (50257, "gpt2") and (tok_dir / "vocab.json").exists()


@pytest.mark.slow
def test_bf16_checkpoints_of_every_stage_consolidate_to_deepspeeds_fp32_weights(tmp_path):
    """bf16 ZeRO 1/2/3 checkpoints from 2 ranks (all named bf16_zero_pp_rank_* by DeepSpeed): the
    export's weights are bitwise DeepSpeed's own full fp32 parameters; ZeRO-1 (BF16_Optimizer,
    which zero_to_fp32 refuses) read from its partitions, ZeRO-2/3 still by zero_to_fp32."""
    from _dist import TESTS_DIR, launch

    r = launch(TESTS_DIR / "bf16_export_worker.py", 2, [str(tmp_path)], timeout=300)
    assert r["1"]["wrapper"] == "BF16_Optimizer" and r["2"]["wrapper"] == "DeepSpeedZeroOptimizer"
    assert r["3"]["wrapper"] == "DeepSpeedZeroOptimizer_Stage3"
    assert r["1"]["consolidation"].startswith("BF16_Optimizer partitions")
    assert r["2"]["consolidation"] == r["3"]["consolidation"] == "deepspeed.utils.zero_to_fp32"
    for stage in ("1", "2", "3"):
        assert any(f.startswith("bf16_zero_pp_rank_1_") for f in r[stage]["files"]), r[stage]["files"]
        # the tied head comes back as the embedding (the model ties them again on load)
        assert set(r[stage]["missing"]) <= {"lm_head.weight"}, r[stage]["missing"]
        assert r[stage]["bitwise"] and r[stage]["max_diff"] == 0.0, (stage, r[stage])
