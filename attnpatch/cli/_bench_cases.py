"""What ``python -m attnpatch bench`` measures: shapes, presets and the ``B,S,H,D[,Hkv[,Skv]]`` syntax."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

SHAPE_SYNTAX = "B,S,H,D[,Hkv[,Skv]]"
SHAPE_HELP = (
    f"{SHAPE_SYNTAX}: batch, seq, heads, head_dim, optional key/value heads (GQA) and key/value seq "
    "(e.g. 1,4096,24,128 | 1,4096,32,128,8 | 8,1,32,128,8,4096)"
)
CPU_MAX_SEQ = 256


@dataclass(frozen=True)
class Case:
    """One attention shape. Tensors: query (batch, seq_q, heads_q, head_dim), key/value (batch, seq_kv, heads_kv,
    head_dim)."""

    preset: str
    name: str
    batch: int
    seq_q: int
    heads_q: int
    head_dim: int
    heads_kv: int
    seq_kv: int
    causal: bool = False
    scaled_from: tuple[int, int] | None = None  # (seq_q, seq_kv) before a CPU cap

    @property
    def label(self) -> str:
        return f"{self.preset} {self.name}" if self.name else self.preset

    @property
    def shape(self) -> str:
        text = f"{self.batch}x{self.seq_q}x{self.heads_q}x{self.head_dim}"
        if self.heads_kv != self.heads_q or self.seq_kv != self.seq_q:
            text += f" kv {self.seq_kv}x{self.heads_kv}"
        return text + (" causal" if self.causal else "")

    @property
    def flops(self) -> float:
        """Multiply-adds of QK^T and PV, 2 flops each, over the query-key pairs a causal mask leaves."""
        if not self.causal:
            return 4.0 * self.batch * self.heads_q * self.head_dim * self.seq_q * self.seq_kv
        pairs = sum(min(i + 1, self.seq_kv) for i in range(self.seq_q))  # top-left aligned: query i sees 0..i
        return 4.0 * self.batch * self.heads_q * self.head_dim * pairs


def _case(preset: str, name: str, b: int, s: int, h: int, d: int, hkv: int | None = None, skv: int | None = None,
          causal: bool = False) -> Case:  # fmt: skip
    return Case(preset, name, b, s, h, d, hkv or h, skv or s, causal)


# Shapes as the models run them at their usual resolution/length (batch 2 = classifier-free guidance).
PRESETS: dict[str, tuple[str, list[Case]]] = {
    "sd15": (
        "Stable Diffusion 1.5 UNet at 512x512: 64x64 latent self-attention and CLIP cross-attention",
        [_case("sd15", "self", 2, 4096, 8, 40), _case("sd15", "cross", 2, 4096, 8, 40, skv=77)],
    ),
    "sdxl": (
        "SDXL UNet at 1024x1024: self-attention at 64x64 and 32x32 latents, cross-attention",
        [
            _case("sdxl", "self-64", 2, 4096, 10, 64),
            _case("sdxl", "self-32", 2, 1024, 20, 64),
            _case("sdxl", "cross", 2, 4096, 10, 64, skv=77),
        ],
    ),
    "flux-1024": (
        "Flux.1 at 1024x1024: joint attention over 4096 image + 512 text tokens, 24 heads of 128",
        [_case("flux-1024", "joint", 1, 4608, 24, 128)],
    ),
    "wan": (
        "Wan 2.1 1.3B, 480p x 81 frames: 32760-token self-attention and text cross-attention",
        [_case("wan", "self", 1, 32760, 12, 128), _case("wan", "cross", 1, 32760, 12, 128, skv=512)],
    ),
    "llama-prefill": (
        "Llama 3 8B prefill: 4096 tokens, causal, 32 query heads over 8 key/value heads (GQA)",
        [_case("llama-prefill", "", 1, 4096, 32, 128, hkv=8, causal=True)],
    ),
    "llama-decode": (
        "Llama 3 8B decode: batch 8, one new token against a 4096-token KV cache, GQA 32/8",
        [_case("llama-decode", "", 8, 1, 32, 128, hkv=8, skv=4096)],
    ),
}


class BenchError(ValueError):
    """Bad command-line input (unknown preset, malformed shape)."""


def presets_help() -> str:
    width = max(len(n) for n in PRESETS)
    return "\n".join(f"  {name:<{width}}  {text}" for name, (text, _) in PRESETS.items())


def parse_shape(text: str, causal: bool = False) -> Case:
    """``B,S,H,D[,Hkv[,Skv]]`` -> Case; raises BenchError naming the syntax and the presets."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 4 <= len(values) <= 6 or min(values) < 1:
        raise BenchError(
            f"invalid shape {text!r}: expected {SHAPE_HELP}, positive integers. Or a preset: {', '.join(PRESETS)}"
        )
    b, s, h, d = values[:4]
    hkv = values[4] if len(values) > 4 else h
    skv = values[5] if len(values) > 5 else s
    if h % hkv:
        raise BenchError(f"invalid shape {text!r}: heads {h} is not a multiple of key/value heads {hkv} (GQA)")
    return Case("custom", text, b, s, h, d, hkv, skv, causal)


def select_cases(presets: Sequence[str], shapes: Sequence[str], causal: bool, max_seq: int | None) -> list[Case]:
    cases: list[Case] = []
    for name in presets:
        key = name.strip().lower()
        if key not in PRESETS:
            raise BenchError(f"unknown preset {name!r}: valid presets are\n{presets_help()}\nor --shape {SHAPE_HELP}")
        cases.extend(_capped(c, max_seq) for c in PRESETS[key][1])
    cases.extend(parse_shape(s, causal) for s in shapes)
    return cases


def _capped(case: Case, max_seq: int | None) -> Case:
    if max_seq is None or max(case.seq_q, case.seq_kv) <= max_seq:
        return case
    return dataclasses.replace(
        case, seq_q=min(case.seq_q, max_seq), seq_kv=min(case.seq_kv, max_seq), scaled_from=(case.seq_q, case.seq_kv)
    )
