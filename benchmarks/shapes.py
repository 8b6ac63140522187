"""Named weight-shape sets (N = out_features, K = in_features) from real models."""

SHAPE_SETS: dict[str, dict[str, tuple[int, int]]] = {
    "llama3-8b": {"qo": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)},
    "llama3-70b": {"qo": (8192, 8192), "kv": (1024, 8192), "gate_up": (28672, 8192), "down": (8192, 28672)},
    "qwen2.5-7b": {"qo": (3584, 3584), "kv": (512, 3584), "gate_up": (18944, 3584), "down": (3584, 18944)},
    # CPU / interpreter smoke runs: odd N, K not a multiple of 128.
    "smoke": {"odd": (37, 300), "square": (64, 256)},
}

M_VALUES = [1, 4, 16, 64, 256, 4096]
SMOKE_M_VALUES = [1, 17]


def shapes(set_names: list[str]) -> list[tuple[str, int, int]]:
    """[("llama3-8b/down", N, K), ...] for the named sets."""
    out = []
    for set_name in set_names:
        if set_name not in SHAPE_SETS:
            raise SystemExit(f"unknown shape set {set_name!r}; known: {', '.join(SHAPE_SETS)}")
        out += [(f"{set_name}/{name}", n, k) for name, (n, k) in SHAPE_SETS[set_name].items()]
    return out
