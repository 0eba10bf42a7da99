"""safetensors' dtype codes with their sizes and torch dtypes, in one table (torch-free to import)."""
from __future__ import annotations

# code -> (torch dtype name, bytes per element)
DTYPES = {"F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "BF16": ("bfloat16", 2),
          "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8), "BOOL": ("bool", 1),
          "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "I32": ("int32", 4),
          "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8)}


def itemsize(code: str) -> int | None:
    """Bytes per element of a dtype code, or None for a code safetensors does not define."""
    entry = DTYPES.get(code)
    return entry[1] if entry else None


def torch_dtype(code: str):
    """The torch dtype of a safetensors code (``"BF16"``) or a torch name (``"bfloat16"``, ``"torch.bfloat16"``);
    None when neither names one."""
    import torch
    name = DTYPES[code][0] if code in DTYPES else str(code).removeprefix("torch.")
    d = getattr(torch, name, None)
    return d if isinstance(d, torch.dtype) else None


def code_of(dtype) -> str:
    """The safetensors code of a torch dtype; ValueError naming it when the format has none."""
    name = str(dtype).removeprefix("torch.")
    for code, (n, _) in DTYPES.items():
        if n == name:
            return code
    raise ValueError(f"dtype {dtype} has no safetensors code; write the tensor as one of "
                     f"{', '.join(n for n, _ in DTYPES.values())}")
