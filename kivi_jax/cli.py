"""`kivi-jax` command line: generate text, evaluate cache methods, benchmark kernels.

The evals run their matmuls at full precision ("highest"): a quality figure is
the model dtype's, not TF32's on a GPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from kivi_jax.config import IMPLS, PRESETS, KIVIConfig, get_preset
from kivi_jax.default_model import cache_dir, default_model_path


def _bits(text: str) -> float:
  """A bit width as given: "1.5" (ternary) or an integer."""
  return float(text) if "." in text else int(text)


def _model_path(args):
  """`--model` (which must exist), or the default model's file."""
  if args.model is None:
    return default_model_path()
  if not Path(args.model).expanduser().exists():
    raise ValueError(f"--model {args.model!r} does not exist (an HF checkpoint directory "
                     "or a .gguf file)")
  return args.model


def _existing_file(flag: str, value: str, what: str) -> str:
  """`value` of `flag`, expanded, which must name a file: checked before a model loads."""
  path = Path(value).expanduser()
  if not path.is_file():
    raise ValueError(f"{flag} {value!r} is not a file ({what})")
  return str(path)


def _data_path(args) -> str:
  """`--data`, WikiText-2's raw test file."""
  return _existing_file("--data", args.data, "WikiText-2's raw test file, wiki.test.raw; "
                        "the default is relative to the working directory")


def _out_file(text: str) -> str:
  """`--out`: a file to write at the end of a run, so a directory is refused at the start."""
  if Path(text).expanduser().is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is a directory: name a file in it")
  return text


def _kv_config(args) -> KIVIConfig:
  base = get_preset(args.method or "kivi2")
  overrides = {name: getattr(args, name) for name in
               ("k_bits", "v_bits", "group_size", "residual_length")
               if getattr(args, name) is not None}
  return dataclasses.replace(base, **overrides)


_CUT = "\u2063kivi-jax-cut\u2063"
"""Marks where a user's text ends inside a rendered chat template."""


def _chat_parts(tokenizer, text: str) -> tuple[str, str]:
  """A user turn holding `text`, rendered by the chat template and cut where the
  text ends: (everything up to and with the text, what closes the turn and
  opens the answer)."""
  rendered = tokenizer.apply_chat_template(
      [{"role": "user", "content": text + _CUT}], add_generation_prompt=True,
      tokenize=False)
  head, cut, tail = rendered.partition(_CUT)
  if not cut:
    raise ValueError("the tokenizer's chat template rewrites the message; pass --raw")
  return head, tail


def _generate(args) -> int:
  import kivi_jax
  from kivi_jax.generate import generate, prefill_cache

  if args.save_cache and args.resume_cache:
    raise ValueError("--save-cache and --resume-cache exclude each other: save a prompt's "
                     "cache in one run, continue it in later ones")
  if args.save_cache and Path(args.save_cache).exists() and not args.overwrite:
    raise ValueError(f"{args.save_cache} exists: pass --overwrite to replace it")
  explicit = any(getattr(args, name) is not None for name in
                 ("method", "k_bits", "v_bits", "group_size", "residual_length"))
  kv_config = _kv_config(args)
  if args.resume_cache:
    info = kivi_jax.cache_info(args.resume_cache)
    for flag, given in (("--calibration", args.calibration), ("--max-length", args.max_length)):
      if given is not None:
        raise ValueError(f"{flag} belongs to the saved cache: leave it out with "
                         f"--resume-cache")
    chat = (info["metadata"] or {}).get("chat", False)
    if args.raw and chat:
      raise ValueError(f"{args.resume_cache} holds a chat-formatted prompt: leave out --raw")
  elif kv_config.needs_calibration and not args.calibration:
    raise ValueError(f"method {args.method} needs a calibration: make one with "
                     "`kivi-jax calibrate` and pass --calibration")
  calibration_file = args.calibration and _existing_file(
      "--calibration", args.calibration, "make one with `kivi-jax calibrate`")
  path = _model_path(args)
  tokenizer = kivi_jax.load_tokenizer(path)
  model = kivi_jax.load_model(path, dtype=args.dtype)
  if not args.resume_cache:
    chat = bool(tokenizer.chat_template) and not args.raw
  if args.save_cache:
    text = _chat_parts(tokenizer, args.prompt)[0] if chat else args.prompt
  elif args.resume_cache:
    text = f"\n\n{args.prompt}{_chat_parts(tokenizer, '')[1]}" if chat else args.prompt
  else:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True,
        tokenize=False) if chat else args.prompt
  ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)[None, :]
  if not ids.size:
    raise ValueError("the prompt is empty, and no chat template adds to it (--raw, or a "
                     "tokenizer without one): nothing would go to the model")
  calibration = None
  if calibration_file:
    calibration = kivi_jax.Calibration.load(calibration_file, model)

  if args.save_cache:
    window = model.config.max_position_embeddings
    max_length = args.max_length or min(ids.shape[1] + 1024, window)
    cache = prefill_cache(model, ids, kv_config=kv_config, max_length=max_length,
                          calibration=calibration, impl=args.impl or "auto")
    saved = kivi_jax.save_cache(args.save_cache, cache, model, metadata={"chat": chat},
                                overwrite=args.overwrite)
    print(f"saved the cache of {ids.shape[1]} prompt tokens ({cache.nbytes() / 2**20:.1f} "
          f"MiB, room for {min(cache.capacity, window) - ids.shape[1]} more tokens) to "
          f"{saved}\n"
          f"ask about it with: kivi-jax generate QUESTION --resume-cache {saved}")
    return 0
  cache = None
  if args.resume_cache:
    cache = kivi_jax.restore_cache(args.resume_cache, model,
                                   kv_config=kv_config if explicit else None, impl=args.impl)

  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
      model.config.eos_token_id
  # <|im_end|> closes an assistant turn in ChatML templates: stop there too.
  stops = {eos} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",)
                   if t in tokenizer.get_vocab()}
  stops.discard(None)
  generated: list[int] = []
  shown = 0

  def stream(tokens, done):
    nonlocal shown
    if done[0] or int(tokens[0]) in stops:
      return
    generated.append(int(tokens[0]))
    text = tokenizer.decode(generated, skip_special_tokens=True)
    # Hold back a trailing partial UTF-8 character until it is complete.
    if not text.endswith("\ufffd"):
      sys.stdout.write(text[shown:])
      sys.stdout.flush()
      shown = len(text)

  # A resumed cache brings its own config, capacity, calibration and impl.
  source = dict(cache=cache) if cache is not None else dict(
      kv_config=kv_config, max_length=args.max_length, calibration=calibration,
      impl=args.impl)
  out = generate(model, ids, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, eos_token_id=sorted(stops), streamer=stream, **source)
  np.asarray(out)  # waits for the loop, and so for every streamed token
  sys.stdout.write("\n")
  return 0


def _presets(methods: str) -> dict[str, KIVIConfig]:
  """`"fp16,kivi2"` -> their configs; an unknown name fails before any work."""
  return {m: get_preset(m) for m in (m.strip() for m in methods.split(",")) if m}


def _positive_ints(flag: str, text: str) -> tuple[int, ...]:
  """`"1,8,32"` -> `(1, 8, 32)`; `""` -> `()`; anything else names `flag`."""
  items = [x.strip() for x in text.split(",") if x.strip()]
  if not all(x.isdigit() and int(x) > 0 for x in items):
    raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
  return tuple(int(x) for x in items)


def _calibrations(model, configs: dict[str, KIVIConfig], tokens: np.ndarray,
                  data_name: str, n_tokens: int | None = None) -> dict:
  """A calibration for each config that needs one, on the text's last
  `n_tokens` (default `CALIBRATION_TOKENS`; disjoint from the evaluated
  windows, cut from the start)."""
  from kivi_jax import eval as kv_eval
  from kivi_jax.calibration import calibrate

  n_tokens = n_tokens or kv_eval.CALIBRATION_TOKENS
  source = (f"last {n_tokens} tokens of {data_name}, in sequences of "
            f"{kv_eval.CALIBRATION_SEQ}, seed 0")
  out = {}
  for name, config in configs.items():
    if config.needs_calibration:
      print(f"{name:>24}  calibrating on the {source}", flush=True)
      out[name] = calibrate(model, kv_eval.calibration_batches(tokens, n_tokens), config,
                            seed=0, source=source)
  return out


def _calibration_row(calib) -> dict:
  if calib is None:
    return {}
  return {"calibration": calib.source, "clip_k": calib.clip_k.tolist(),
          "clip_v": calib.clip_v.tolist()}


def _write_json(path: str, out: dict) -> None:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {path}")


def git_commit(path: Path) -> str | None:
  """The commit checked out where `path` lies, with "-dirty" where a tracked
  file differs from it (the code that ran was not that commit's), or None
  outside a repository."""
  import subprocess

  def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=path,
                          check=True).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    return commit + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else commit
  except (OSError, subprocess.CalledProcessError):
    return None


def run_metadata() -> dict:
  """Where and when a figure was measured: device, jax version, date, git commit.

  The commit comes from git (`git_commit`), or from `KIVI_JAX_COMMIT` where the
  tree was copied without its repository (the GPU machine).
  """
  import datetime
  import os

  import jax
  commit = os.environ.get("KIVI_JAX_COMMIT") or git_commit(Path(__file__).parent)
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "commit": commit}


def _calibrate(args) -> int:
  import jax

  import kivi_jax
  from kivi_jax import eval as kv_eval

  config = get_preset(args.method)
  step = kv_eval.CALIBRATION_SEQ * kv_eval.CALIBRATION_BATCH
  if args.tokens is not None and (args.tokens <= 0 or args.tokens % step):
    raise ValueError(f"--tokens must be a positive multiple of {step} (sequences of "
                     f"{kv_eval.CALIBRATION_SEQ} tokens in batches of "
                     f"{kv_eval.CALIBRATION_BATCH}), got {args.tokens}")
  data = _data_path(args)
  path = _model_path(args)
  model = kivi_jax.load_model(path, dtype=args.dtype)
  tokens = kv_eval.wikitext_tokens(kivi_jax.load_tokenizer(path), data)
  with jax.default_matmul_precision("highest"):
    calib = _calibrations(model, {args.method: config}, tokens, Path(data).name,
                          args.tokens)[args.method]
  calib.save(args.out)
  print(f"wrote {args.out}")
  return 0


def _eval_ppl(args) -> int:
  import jax

  import kivi_jax
  from kivi_jax import eval as kv_eval

  configs = _presets(args.methods)
  setting = dict(kv_eval.QUICK if args.setting == "quick" else kv_eval.FULL)
  overrides = {k: getattr(args, k) for k in setting if getattr(args, k) is not None}
  setting.update(overrides)
  setting_name = "custom" if overrides else args.setting
  data = _data_path(args)
  path = _model_path(args)
  model = kivi_jax.load_model(path, dtype=args.dtype)
  for config in configs.values():
    config.check_head_dim(model.config.head_dim)  # every method, before any work
  tokens = kv_eval.wikitext_tokens(kivi_jax.load_tokenizer(path), data)
  evaluated = setting["windows"] * (setting["prefill"] + setting["decode"])
  if any(c.needs_calibration for c in configs.values()) and \
      evaluated > tokens.size - kv_eval.CALIBRATION_TOKENS:
    raise ValueError(f"the windows ({evaluated} tokens) overlap the calibration text (the "
                     f"last {kv_eval.CALIBRATION_TOKENS} of {tokens.size})")
  rows = []
  with jax.default_matmul_precision("highest"):
    calibrations = _calibrations(model, configs, tokens, Path(data).name)
  for name, config in configs.items():
    with jax.default_matmul_precision("highest"):
      result = kv_eval.kv_perplexity(model, tokens, config, **setting,
                                     calibration=calibrations.get(name))
    k_bpe, v_bpe = config.bits_per_element(scale_bits=16, head_dim=model.config.head_dim,
                                           num_kv_heads=model.config.num_kv_heads)
    rows.append({"method": name, "kv_ppl": result.kv_ppl, **dataclasses.asdict(config),
                 "bits_per_element": (k_bpe + v_bpe) / 2,
                 **_calibration_row(calibrations.get(name))})
    print(f"{name:>24}  KV-ppl {result.kv_ppl:8.3f}", flush=True)
  fp = next((r["kv_ppl"] for r in rows if r["method"] == "fp16"), None)
  print("\n| method | k bits | v bits | group | residual | bits/elem | KV-ppl | vs fp |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    rel = f"{100 * (r['kv_ppl'] / fp - 1):+.2f}%" if fp else "n/a"
    # SKVQ: tokens per flush, and channels per group over the hidden dim.
    group = r["group_size"] if r["channel_group"] is None else \
        f"{r['group_size']} tokens, {r['channel_group']} channels"
    print(f"| {r['method']} | {r['k_bits']} | {r['v_bits']} | {group} | "
          f"{r['residual_length']} | {r['bits_per_element']:.3g} | {r['kv_ppl']:.3f} | {rel} |")
  if args.out:
    out = {**run_metadata(), "protocol": "Q1 KV-perplexity", "setting": setting_name,
           "bits_per_element": "mean of keys and values in the quantized block, "
                               "counting 16-bit scales and zeros as on accelerators",
           **setting, "model": Path(path).name, "dtype": args.dtype,
           "data": Path(data).name, "tokens": int(tokens.size), "rows": rows}
    _write_json(args.out, out)
  return 0


def _eval_passkey(args) -> int:
  import jax

  import kivi_jax
  from kivi_jax import eval as kv_eval

  configs = _presets(args.methods)
  lengths = list(_positive_ints("--lengths", args.lengths))
  calibrated = any(c.needs_calibration for c in configs.values())
  data = _data_path(args) if calibrated else None
  path = _model_path(args)
  model = kivi_jax.load_model(path, dtype=args.dtype)
  for config in configs.values():
    config.check_head_dim(model.config.head_dim)
  tokenizer = kivi_jax.load_tokenizer(path)
  rows, records = [], {}
  with jax.default_matmul_precision("highest"):
    calibrations = {}
    if calibrated:
      calibrations = _calibrations(model, configs, kv_eval.wikitext_tokens(tokenizer, data),
                                   Path(data).name)
    for name, config in configs.items():
      result = kv_eval.passkey(model, tokenizer, config, lengths=lengths, depths=args.depths,
                               trials=args.trials, seed=args.seed,
                               batch_size=args.batch_size,
                               calibration=calibrations.get(name))
      records[name] = result.records
      for (length, bucket), acc in sorted(result.accuracy.items()):
        rows.append({"method": name, "length": length, "bucket": bucket,
                     "depth_range": [bucket / args.depths, (bucket + 1) / args.depths],
                     "trials": args.trials, "accuracy": acc,
                     **_calibration_row(calibrations.get(name))})
      mean = np.mean([a for a in result.accuracy.values()])
      print(f"{name:>24}  passkey accuracy {mean:.3f}", flush=True)
  print("\n| method | " + " | ".join(str(n) for n in lengths) + " |")
  print("| --- |" + " --- |" * len(lengths))
  for name in configs:
    accs = [np.mean([r["accuracy"] for r in rows
                     if r["method"] == name and r["length"] == n]) for n in lengths]
    print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
  if args.out:
    out = {**run_metadata(), "protocol": "Q2 passkey retrieval", "model": Path(path).name,
           "dtype": args.dtype, "depths": args.depths, "trials": args.trials,
           "seed": args.seed, "rows": rows, "records": records}
    _write_json(args.out, out)
  return 0


def _bench_attention(args) -> int:
  from kivi_jax import bench

  lengths = _positive_ints("--lengths", args.lengths)
  methods = tuple(m.strip() for m in args.methods.split(","))
  result = bench.attention_benchmark(lengths=lengths, batch=args.batch, q_heads=args.q_heads,
                                     kv_heads=args.kv_heads, head_dim=args.head_dim,
                                     methods=methods, repeats=args.repeats,
                                     layouts=tuple(args.layouts.split(",")),
                                     progress=lambda s: print(s, flush=True))
  print()
  print(bench.markdown_table(result))
  if args.out:
    out = {**run_metadata(), **result}
    _write_json(args.out, out)
  return 0


def _bench_generate(args) -> int:
  import jax

  from kivi_jax import bench_generate
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  if not args.row_timeout > 0:
    raise ValueError(f"--row-timeout must be a positive number of seconds, got "
                     f"{args.row_timeout}")
  requests = []
  for r in filter(str.strip, args.requests.split(",")):  # "" for steps only
    prompt, _, new = r.partition("+")
    if not (prompt.isdigit() and new.isdigit() and int(prompt) > 0 and int(new) > 0):
      raise ValueError(f"--requests takes PROMPT+NEW pairs such as 1024+512, got {r!r}")
    requests.append((int(prompt), int(new)))
  mesh = None
  if args.mesh:
    axes = dict(part.partition("=")[::2] for part in args.mesh.split(","))
    if set(axes) != {"data", "model"} or not all(v.isdigit() and int(v) > 0
                                                  for v in axes.values()):
      raise ValueError(f"--mesh takes data=D,model=M with positive D and M, got {args.mesh!r}")
    mesh = (int(axes["data"]), int(axes["model"]))
  batches = _positive_ints("--batches", args.batches)
  step_batches = _positive_ints("--step-batches", args.step_batches)
  hf_batches = _positive_ints("--hf-batches", args.hf_batches)
  if args.step_context < 1:
    raise ValueError(f"--step-context must be a positive number of tokens, got "
                     f"{args.step_context}")
  if args.longest_context is not None and args.longest_context < 1:
    raise ValueError(f"--longest-context must be a positive number of new tokens, got "
                     f"{args.longest_context}")
  # This process only plans and collects; each measurement runs in a worker
  # process that must find the accelerator's memory untouched.
  jax.config.update("jax_platforms", "cpu")
  bench_generate.generate_benchmark(
      shape=args.shape, methods=methods, requests=tuple(requests),
      batches=batches, step_batches=step_batches, step_context=args.step_context,
      largest=not args.no_largest, hf_batches=hf_batches, out=args.out,
      mesh=mesh, row_timeout=args.row_timeout, longest_new=args.longest_context,
      progress=lambda s: print(s, flush=True))
  if args.out:
    print(f"wrote {args.out}")
  return 0


def _eval_parser(sub, name: str, help: str, data_help: str, run):
  """An `eval` subcommand with the options every evaluation takes."""
  parser = sub.add_parser(name, help=help)
  parser.add_argument("--model", help="HF checkpoint directory or .gguf file "
                      "(default: SmolLM2-135M-Instruct)")
  parser.add_argument("--methods", default="fp16,kivi4,kivi2",
                      help=f"comma-separated methods from: {', '.join(PRESETS)}")
  parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw",
                      help=data_help)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16", "float16"))
  parser.add_argument("--out", type=_out_file, help="write the results as JSON here")
  parser.set_defaults(run=run)
  return parser


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="kivi-jax", description="KIVI / SKVQ quantized KV caches for JAX LLM inference")
  sub = parser.add_subparsers(dest="command", required=True)
  gen = sub.add_parser("generate", help="generate text, streaming it to stdout")
  gen.add_argument("prompt")
  gen.add_argument("--model", help="HF checkpoint directory or .gguf file "
                   "(default: SmolLM2-135M-Instruct, fetched on first use)")
  gen.add_argument("--method", choices=sorted(PRESETS),
                   help="cache method preset (default: kivi2, or a resumed cache's); the "
                   "flags below override it")
  gen.add_argument("--k-bits", type=_bits)
  gen.add_argument("--v-bits", type=_bits)
  gen.add_argument("--group-size", type=int)
  gen.add_argument("--residual-length", type=int)
  gen.add_argument("--max-new-tokens", type=int, default=128)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--top-k", type=int)
  gen.add_argument("--top-p", type=float)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  gen.add_argument("--raw", action="store_true",
                   help="do not apply the tokenizer's chat template")
  gen.add_argument("--calibration", help="a `kivi-jax calibrate` JSON file (SKVQ methods)")
  gen.add_argument("--impl", choices=IMPLS,
                   help="what reads the cache in decode steps: auto (the default: the "
                   "backend's Pallas kernel where it applies), reference (jnp), gpu or tpu "
                   "(that kernel; gpu also writes the cache with the quantize-and-pack "
                   "kernel)")
  gen.add_argument("--max-length", type=int,
                   help="tokens the cache holds per row (default: the prompt and "
                   "--max-new-tokens; with --save-cache, the prompt and 1024 more)")
  gen.add_argument("--save-cache", metavar="PATH",
                   help="prefill the prompt (a document, say) and save its cache to PATH "
                   "instead of answering; with a chat template the prompt opens a user turn "
                   "that a later --resume-cache run completes")
  gen.add_argument("--resume-cache", metavar="PATH",
                   help="continue a cache saved with --save-cache: the prompt (a question) "
                   "is appended to it, and the saved file stays as it is")
  gen.add_argument("--overwrite", action="store_true",
                   help="let --save-cache replace an existing checkpoint")
  gen.set_defaults(run=_generate)

  cal = sub.add_parser("calibrate", help="calibrate an SKVQ method on the tail of "
                       "WikiText-2 and save it as JSON")
  cal.add_argument("--model", help="HF checkpoint directory or .gguf file "
                   "(default: SmolLM2-135M-Instruct)")
  cal.add_argument("--method", default="skvq-k2v2",
                   choices=sorted(m for m, c in PRESETS.items() if c.needs_calibration))
  cal.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw",
                   help="WikiText-2 raw test file; its last tokens are the calibration text")
  cal.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  cal.add_argument("--tokens", type=int,
                   help="calibrate on the text's last TOKENS tokens, a multiple of 2048 "
                   "(default 8192, as the README's figures; fewer is quicker)")
  cal.add_argument("--out", type=_out_file, required=True,
                   help="where to write the calibration JSON")
  cal.set_defaults(run=_calibrate)

  ev = sub.add_parser("eval", help="quality of cache methods on a real model")
  ev_sub = ev.add_subparsers(dest="eval_command", required=True)
  ppl = _eval_parser(ev_sub, "ppl", "KV-perplexity on WikiText-2 (PROTOCOLS.md Q1)",
                     "WikiText-2 raw test file", _eval_ppl)
  ppl.add_argument("--setting", choices=("quick", "full"), default="quick",
                   help="quick: P=512, D=256, 4 windows; full: P=2048, D=512, 8 windows")
  for name in ("prefill", "decode", "windows"):
    ppl.add_argument(f"--{name}", type=int, help="override the setting's value")

  pk = _eval_parser(ev_sub, "passkey", "passkey retrieval (PROTOCOLS.md Q2)",
                    "WikiText-2 raw test file, whose tail calibrates SKVQ methods",
                    _eval_passkey)
  pk.add_argument("--lengths", default="512,1024,2048,4096,8192",
                  help="context lengths in tokens, prompt and answer together")
  pk.add_argument("--depths", type=int, default=5, help="equal depth buckets of [0, 1]")
  pk.add_argument("--trials", type=int, default=20, help="trials per length and bucket")
  pk.add_argument("--seed", type=int, default=0)
  pk.add_argument("--batch-size", type=int, default=4, help="prompts per generate call")

  bench = sub.add_parser("bench", help="speed benchmarks (need a GPU)")
  bench_sub = bench.add_subparsers(dest="bench_command", required=True)
  att = bench_sub.add_parser("attention", help="decode attention vs cuDNN bf16 "
                             "(PROTOCOLS.md P1)")
  att.add_argument("--lengths", default="4096,16384,32768,65536,131072")
  att.add_argument("--methods", default="kivi4,kivi2")
  att.add_argument("--batch", type=int, default=8)
  att.add_argument("--q-heads", type=int, default=32)
  att.add_argument("--kv-heads", type=int, default=8)
  att.add_argument("--head-dim", type=int, default=128)
  att.add_argument("--repeats", type=int, default=30)
  att.add_argument("--layouts", default="auto", help="cache layouts to time each method "
                   "in, comma-separated: auto, slots, pairs (init_cache's layout)")
  att.add_argument("--out", type=_out_file, help="write the results as JSON here")
  att.set_defaults(run=_bench_attention)
  gen_bench = bench_sub.add_parser(
      "generate", help="end-to-end generate: tokens/s, largest batch, peak memory, the "
      "decode step against its floor, HF transformers beside (PROTOCOLS.md P2)")
  gen_bench.add_argument("--shape", default="llama2-7b",
                         help="llama2-7b or llama3-8b (random bf16 weights)")
  gen_bench.add_argument("--methods", default="fp16,kivi4,kivi2,skvq-k2v2-g16-fp8")
  gen_bench.add_argument("--requests", default="1024+512,4096+512",
                         help="prompt+new tokens per row, comma-separated ('' for none: "
                         "the decode steps only)")
  gen_bench.add_argument("--batches", default="1,8,32",
                         help="fixed batches (those below the largest that fits)")
  gen_bench.add_argument("--no-largest", action="store_true",
                         help="skip the largest batch that fits")
  gen_bench.add_argument("--step-batches", default="1,32",
                         help="batches of the decode-step measurement ('' for none)")
  gen_bench.add_argument("--step-context", type=int, default=1280,
                         help="tokens cached per row in the decode-step measurement")
  gen_bench.add_argument("--hf-batches", default="32,64,128",
                         help="batches of HF transformers' generate ('' for none)")
  gen_bench.add_argument("--mesh", help="data=D,model=M: run kivi-jax over a mesh of D x M "
                         "devices (rows over data, heads over model), the largest batch planned "
                         "for each device's memory")
  gen_bench.add_argument("--longest-context", type=int, metavar="NEW",
                         help="also each method's longest context: one row of the longest "
                         "prompt that fits with NEW new tokens (kivi_jax.max_context), "
                         "generated once")
  gen_bench.add_argument("--out", type=_out_file,
                         help="JSON results, written after every row and added to the rows "
                         "already in the file")
  gen_bench.add_argument("--row-timeout", type=float, default=1800,
                         help="seconds a row's process may run before it is stopped and "
                         "recorded as timed out, with the stages it reached (the sweep goes on)")
  gen_bench.set_defaults(run=_bench_generate)
  return parser


# The persistent compilation cache's bound, least recently used entries dropped
# past it. A SmolLM2 `generate` (prefill and decode loop) takes under 2 MiB.
COMPILE_CACHE_BYTES = 2**30


def _keep_compiled_programs() -> None:
  """Compiled programs kept across runs, in `cache_dir()/xla` unless
  `JAX_COMPILATION_CACHE_DIR` names another place: a second `kivi-jax generate`
  reads the model's programs back where the first compiled them."""
  import jax

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  _keep_compiled_programs()
  try:
    return args.run(args)
  except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
    print(f"kivi-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
