"""A tiny (~470 KB) llama-architecture GGUF model that llama.cpp loads.

Random f32 weights, so it talks nonsense, but it is a real model: llama-server
loads it in well under a second and answers every endpoint with it.

    python -m testbed.tiny_gguf OUT.gguf [--seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import gguf

N_VOCAB_WORDS = (
    "\u2581",
    "\u2581the", "\u2581of", "\u2581in", "\u2581was", "\u2581Who", "\u2581who",
    "\u2581president", "\u2581President", "\u2581United", "\u2581States",
    "\u2581Bill", "\u2581Clinton", "\u2581hello", "\u2581world", "\u2581yes", "\u2581no",
    "\u25811997", "?", ".", ",",
)

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_BLOCK = 2
N_FF = 128
N_CTX = 2048
RMS_EPS = 1e-5


def vocab() -> tuple[list[str], list[float], list[int]]:
    """SPM vocabulary: <unk>, <s>, </s>, the 256 byte tokens, some words."""
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(gguf.TokenType.BYTE)
    for i, word in enumerate(N_VOCAB_WORDS):
        tokens.append(word)
        scores.append(-float(i + 1))
        types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny model to ``path``; same seed, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("backchat-tiny")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_BLOCK)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = lambda n: np.ones((n,), dtype=np.float32)  # noqa: E731

    # numpy shapes are (rows, cols): ggml's ne reversed.
    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD))
    w.add_tensor("output_norm.weight", ones(N_EMBD))
    w.add_tensor("output.weight", rand(n_vocab, N_EMBD))
    kv = head_dim * N_HEAD_KV
    for i in range(N_BLOCK):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(N_EMBD))
        w.add_tensor(p + "attn_q.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "attn_k.weight", rand(kv, N_EMBD))
        w.add_tensor(p + "attn_v.weight", rand(kv, N_EMBD))
        w.add_tensor(p + "attn_output.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "ffn_norm.weight", ones(N_EMBD))
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", rand(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = write_tiny_gguf(args.out, args.seed)
    print(f"{out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
