#!/usr/bin/env python3
"""Build a tiny, fully local LlamaForCausalLM model folder + LoRA adapters for a real vLLM (CPU).

Runs in the vLLM venv (`.venv-vllm`, made by `./dev realengine`: torch, transformers, peft and tokenizers
come with vLLM), as a script, never imported by the lab or the picker:

    .venv-vllm/bin/python lab/epp_lab/realengine/build_model.py OUT_DIR [--adapters 3] [--force]

Produces (nothing is downloaded; HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are forced on):
    OUT_DIR/model/           config.json, generation_config.json, tokenizer.json,
                             tokenizer_config.json, chat template, model.safetensors (random,
                             seeded; vLLM can also ignore it with --load-format dummy)
    OUT_DIR/loras/lora-N/    adapter_config.json + adapter_model.safetensors (peft, r=8 on
                             q_proj/v_proj, seeded random non-zero A and B)
    OUT_DIR/BUILD_INFO.json  versions, seeds, hashes of the produced files (also the idempotency stamp)

The tokenizer is a byte-level BPE (vocab 4096) trained on the .py files of the running Python's
standard library (or --corpus-dir), in sorted order, so the result is deterministic for a given
Python + tokenizers version.

Special tokens: <|begin_of_text|> (BOS, id 0), <|end_of_text|> (EOS/PAD, id 1), <|im_start|> (2),
<|im_end|> (3). The tokenizer's post-processor prepends BOS on encode(add_special_tokens=True),
like Llama 3. The chat template starts with {{ bos_token }} (so vLLM, which tokenizes rendered chat
prompts with add_special_tokens=False, gets exactly one BOS).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # determinism + no fork warnings
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BUILD_VERSION = 1  # bump when the recipe changes: invalidates existing builds

VOCAB_SIZE = 4096
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    initializer_range=0.02,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

SEED = 1234
LORA_SEED_BASE = 4321
LORA_RANK = 8


def _corpus_files(corpus_dir: Path, max_bytes: int) -> list[str]:
    files, total = [], 0
    for p in sorted(corpus_dir.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts or "tests" in p.parts:
            continue
        try:
            size = p.stat().st_size
        except OSError:
            continue
        files.append(str(p))
        total += size
        if total >= max_bytes:
            break
    if not files:
        sys.exit(f"build_model: no .py files under {corpus_dir}")
    return files


def _iter_texts(files: list[str]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield fh.read()


def build_tokenizer(model_dir: Path, corpus_dir: Path, max_bytes: int) -> tuple[int, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = _corpus_files(corpus_dir, max_bytes)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(files), trainer=trainer, length=len(files))
    # Prepend BOS on encode(add_special_tokens=True) (Llama-3 style); single and pair templates.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3], "special token ids moved"

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(model_dir))
    return len(files), tok.get_vocab_size()


def build_model_and_loras(model_dir: Path, lora_root: Path, n_adapters: int, save_weights: bool) -> list[str]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(SEED)
    cfg = LlamaConfig(**MODEL_CONFIG)
    cfg.dtype = "bfloat16"  # written as "dtype" (transformers 5); vLLM reads it
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if save_weights:
        model.save_pretrained(str(model_dir), safe_serialization=True)
    else:
        cfg.save_pretrained(str(model_dir))
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1).save_pretrained(str(model_dir))

    from peft import LoraConfig, get_peft_model

    names = []
    for i in range(n_adapters):
        name = f"lora-{i + 1}"
        torch.manual_seed(LORA_SEED_BASE + i)
        base = LlamaForCausalLM(cfg).to(torch.float32)
        base.config.name_or_path = str(model_dir)
        lcfg = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        pm = get_peft_model(base, lcfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn_like(p) * 0.05)  # non-zero A *and* B: adapter changes outputs
        out = lora_root / name
        pm.save_pretrained(str(out), safe_serialization=True)
        # Make the adapter folder self-contained / path-independent.
        acfg_path = out / "adapter_config.json"
        acfg = json.loads(acfg_path.read_text())
        acfg["base_model_name_or_path"] = "base"
        # peft stores a set: its order depends on the hash seed
        acfg["target_modules"] = sorted(acfg["target_modules"])
        acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        (out / "README.md").unlink(missing_ok=True)  # peft model card: not needed
        names.append(name)
    for p in list(model_dir.iterdir()) + list(lora_root.rglob("*")):
        if p.is_file():
            p.chmod(0o644)
    return names


def _file_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "BUILD_INFO.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--adapters", type=int, default=3, help="number of LoRA adapters (default 3)")
    ap.add_argument("--force", action="store_true", help="rebuild even if BUILD_INFO.json matches")
    ap.add_argument(
        "--no-weights",
        action="store_true",
        help="skip model.safetensors (then vLLM needs --load-format dummy)",
    )
    ap.add_argument(
        "--corpus-dir",
        type=Path,
        default=None,
        help="text corpus (.py files) for the tokenizer; default: this Python's stdlib",
    )
    ap.add_argument(
        "--corpus-bytes",
        type=int,
        default=8_000_000,
        help="stop adding corpus files after this many bytes (default 8 MB)",
    )
    args = ap.parse_args(argv)

    out: Path = args.out_dir.resolve()
    corpus_dir = args.corpus_dir or Path(sysconfig.get_paths()["stdlib"])
    info_path = out / "BUILD_INFO.json"
    want = {
        "build_version": BUILD_VERSION,
        "adapters": args.adapters,
        "weights": not args.no_weights,
        "corpus_bytes": args.corpus_bytes,
        "seed": SEED,
    }
    if info_path.exists() and not args.force:
        try:
            have = json.loads(info_path.read_text())
            if all(have.get(k) == v for k, v in want.items()):
                print(f"build_model: {out} already built (BUILD_INFO.json matches); use --force to rebuild")
                return 0
        except json.JSONDecodeError:
            pass

    t0 = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir, lora_root = tmp / "model", tmp / "loras"
    model_dir.mkdir(parents=True)
    lora_root.mkdir()

    n_files, vocab = build_tokenizer(model_dir, corpus_dir, args.corpus_bytes)
    t_tok = time.monotonic() - t0
    loras = build_model_and_loras(model_dir, lora_root, args.adapters, not args.no_weights)
    elapsed = time.monotonic() - t0

    import peft
    import tokenizers
    import torch
    import transformers

    info = dict(want)
    info.update(
        corpus=(
            f"{n_files} .py files from the Python {sys.version.split()[0]} stdlib"
            if args.corpus_dir is None
            else f"{n_files} .py files from --corpus-dir"
        ),
        vocab_size=vocab,
        model_config=MODEL_CONFIG,
        special_tokens={t: i for i, t in enumerate(SPECIAL_TOKENS)},
        chat_template=CHAT_TEMPLATE,
        loras=loras,
        versions={
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "peft": peft.__version__,
        },
        build_seconds=round(elapsed, 2),
        tokenizer_seconds=round(t_tok, 2),
        files=_file_hashes(tmp),
    )
    (tmp / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"build_model: built {out} in {elapsed:.1f} s (tokenizer {t_tok:.1f} s, {n_files} corpus files, "
        f"vocab {vocab}, adapters {', '.join(loras)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
