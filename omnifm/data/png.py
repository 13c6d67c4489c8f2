"""Checking PNG files before training starts, without decoding them."""
from PIL import Image


def inspect_png(path, modes):
    """(height, width) of the PNG at path, whose mode must be one of `modes` ("L", "RGB").
    ValueError naming the file if it is unreadable, truncated or of another kind."""
    try:
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            im.verify()  # walks every chunk and its CRC without decoding: catches truncation
    except Exception as e:  # PIL raises OSError, SyntaxError or struct.error for broken files
        raise ValueError(f"{path}: unreadable or truncated PNG ({e})") from e
    if fmt != "PNG" or mode not in modes:
        kinds = " or ".join({"L": "grey (L)"}.get(m, m) for m in modes)
        raise ValueError(f"{path}: expected an 8-bit {kinds} PNG, got {fmt} mode {mode}")
    return h, w
