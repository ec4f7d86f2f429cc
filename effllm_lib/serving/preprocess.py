"""The preprocessing stages of a vision request, each a function, each timed by the caller.

decode (JPEG bytes -> RGB uint8 pixels) -> resize (to the model's input) -> normalize (float, mean/std,
CHW) -> host-to-device copy (``to_device``, done per batch by the server).

Decoders: ``pil`` (Pillow, libjpeg-turbo), ``opencv`` (cv2.imdecode), ``turbo`` (libjpeg-turbo's TurboJPEG
API through simplejpeg) and ``nvjpeg`` (torchvision.io on a CUDA device; the device machine has it, this CPU
box does not); ``decode_batch_isolated`` decodes a whole batch in one nvJPEG call and, when that call fails,
finds the bad image by decoding one at a time. ``reduced=True`` asks the JPEG decoder to scale by 1/2, 1/4 or
1/8 in the DCT domain (Pillow's ``draft``, OpenCV's ``IMREAD_REDUCED_COLOR_k``, simplejpeg's
``min_height``/``min_width``): it never produces fewer pixels than the resize needs, so it is an optimization,
not a quality change beyond the resize itself.

Strict decoding: libjpeg *recovers* from a damaged scan (a file cut short and closed with an end-of-image
marker decodes, the missing blocks grey) and only issues a warning ("premature end of data segment"),
which Pillow and OpenCV do not surface. A server must not answer such a file as if it were the photo, so
with ``strict=True`` (the default) every libjpeg warning is an error: ``turbo`` decodes with simplejpeg's
``strict`` mode (no extra cost); ``pil``, ``opencv`` and ``nvjpeg`` first run the entropy decoder alone
over the file through simplejpeg at the smallest DCT scale (``check_scan``), which costs a fraction of a
full decode; ``strict=False`` restores libjpeg's lenient behaviour (the paper's servers).

Bad input raises ``BadImage`` with the HTTP status a server should answer (400 corrupt or truncated,
413 too many pixels, 415 not a JPEG).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

DECODERS = ("pil", "opencv", "turbo", "nvjpeg")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any 8K photo, far below a decompression bomb


class BadImage(ValueError):
    """The request's image cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -------------------------------------------------------------------------------------------- validation
def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF header without decoding; BadImage if it is not a JPEG."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise BadImage(415, "not a JPEG image (missing the SOI marker FF D8)")
    i, size = 2, None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise BadImage(400, f"corrupt JPEG: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            if width == 0 or height == 0:
                raise BadImage(400, f"corrupt JPEG: frame size {width}x{height}")
            if size is not None:
                # decoders disagree on which of two frame headers counts (Pillow takes the last): a small
                # first one would let a huge second one past the pixel limit
                raise BadImage(400, "corrupt JPEG: more than one frame header (SOF)")
            size = (width, height)
        if marker == 0xDA:  # start of scan: every header segment has been seen
            break
        i += 2 + length
    if size is None:
        raise BadImage(400, "corrupt or truncated JPEG: no frame header (SOF) found")
    return size


def check_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Cheap checks before decoding: a JPEG, not too many pixels, not truncated. Returns (width, height)."""
    width, height = jpeg_size(data)
    if width * height > max_pixels:
        raise BadImage(413, f"image too large: {width}x{height} = {width * height} pixels exceeds the limit "
                            f"of {max_pixels}")
    # A complete JPEG ends with EOI (FF D9); some writers pad a few bytes after it.
    if b"\xff\xd9" not in bytes(data[-64:]):
        raise BadImage(400, "truncated JPEG: no end-of-image marker (FF D9)")
    return width, height


def check_scan(data: bytes) -> None:
    """Run libjpeg-turbo's entropy decoder over the whole file (simplejpeg, smallest DCT scale, grey) and
    turn any warning into ``BadImage(400)``: the strict check for decoders that hide libjpeg's warnings."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, "GRAY", min_height=1, min_width=1, fastdct=True, strict=True)
    except ValueError as exc:
        raise BadImage(400, f"corrupt JPEG: {exc}") from None


# ------------------------------------------------------------------------------------------------- decode
def _reduction(src: tuple[int, int], dst: tuple[int, int]) -> int:
    """Largest DCT scale factor in (1, 2, 4, 8) that keeps both sides at least the target's."""
    w, h = src
    th, tw = dst
    for k in (8, 4, 2):
        if w // k >= tw and h // k >= th:
            return k
    return 1


def decode(data: bytes, decoder: str = "pil", *, target: tuple[int, int] | None = None, reduced: bool = False,
           device: str | torch.device = "cpu", strict: bool = True):
    """JPEG bytes -> RGB pixels: a PIL Image (pil), an HWC uint8 array (opencv, turbo) or a CHW uint8 CUDA
    tensor (nvjpeg). ``reduced`` with ``target`` (H, W) lets the decoder downscale in the DCT domain;
    ``strict`` makes libjpeg's warnings errors (module docstring)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {', '.join(DECODERS)}")
    if reduced and target is None:
        raise ValueError("reduced decoding needs the target size")
    if strict and decoder != "turbo":
        check_scan(data)
    try:
        if decoder == "turbo":
            import simplejpeg

            th, tw = target if reduced else (0, 0)
            return simplejpeg.decode_jpeg(data, "RGB", min_height=th, min_width=tw, strict=strict)
        if decoder == "pil":
            img = Image.open(io.BytesIO(data))
            if reduced:
                img.draft("RGB", (target[1], target[0]))  # picks a scale that keeps at least this size
            img = img.convert("RGB")
            img.load()
            return img
        if decoder == "opencv":
            import cv2

            flag = cv2.IMREAD_COLOR
            if reduced:
                k = _reduction(jpeg_size(data), target)
                flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                        8: cv2.IMREAD_REDUCED_COLOR_8}[k]
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if arr is None:
                raise BadImage(400, "corrupt JPEG: OpenCV could not decode it")
            return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        # nvjpeg through torchvision: the compressed bytes go to the GPU, the pixels never visit the host
        decode_jpeg, mode = _torchvision_jpeg(device)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode, device=device)
    except BadImage:
        raise
    except RuntimeError as exc:
        if str(exc).startswith(NVJPEG_MISSING):  # the server's fault, not the image's
            raise
        raise BadImage(400, f"corrupt JPEG: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(400, f"corrupt JPEG: {exc}") from None


# ------------------------------------------------------------------------------------ batched GPU decode
NVJPEG_MISSING = ("GPU JPEG decoding (decoder 'nvjpeg') needs torchvision with CUDA (torchvision.io.decode_jpeg "
                  "on a CUDA device, nvJPEG), which is not available here")


def _torchvision_jpeg(device):
    """(torchvision.io.decode_jpeg, ImageReadMode.RGB), imported here and not at module import: torchvision is on
    the GPU machine's image but cannot be installed beside a CPU build of torch, so a box without it gets a
    RuntimeError naming what is missing instead of an ImportError at start-up (or a 400 for every request)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise RuntimeError(f"{NVJPEG_MISSING}: importing torchvision.io failed ({type(exc).__name__}: {exc})") \
            from None
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{NVJPEG_MISSING}: it needs a CUDA device (got {str(device)!r}, "
                           f"torch.cuda.is_available() is {torch.cuda.is_available()})")
    return decode_jpeg, ImageReadMode.RGB


def nvjpeg_batch_decoder(device: str | torch.device = "cuda"):
    """torchvision's batched nvJPEG decode as ``decode(list of 1-D uint8 CPU tensors, device) -> list of CHW uint8
    tensors on device`` (one call for the whole batch); RuntimeError naming the missing piece where torchvision
    or CUDA is not available."""
    decode_jpeg, mode = _torchvision_jpeg(device)

    def decode_batch(raws: list[torch.Tensor], device) -> list[torch.Tensor]:
        return list(decode_jpeg(raws, mode=mode, device=device))

    return decode_batch


def decode_batch_isolated(datas: list[bytes], decode_batch, device) -> list:
    """Decode the JPEGs ``datas`` in one call of ``decode_batch`` (``nvjpeg_batch_decoder``); if that call raises
    (nvJPEG fails a whole batch for one bad image) or returns the wrong number of images, decode them one at a
    time so that only the images that fail alone fail. Returns, per image, its CHW uint8 tensor or the
    ``BadImage(400)`` its request gets."""
    raws = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not raws:
        return []
    try:
        out = list(decode_batch(raws, device))
        if len(out) == len(raws) and all(_is_chw3(x) for x in out):
            return out
    except Exception:  # noqa: BLE001 - which image is to blame is found below, one at a time
        pass
    results = []
    for raw in raws:
        try:
            (img,) = decode_batch([raw], device)
            if not _is_chw3(img):
                raise ValueError(f"decoded to shape {tuple(getattr(img, 'shape', ()))}, expected (3, H, W)")
            results.append(img)
        except Exception as exc:  # noqa: BLE001 - decoding only this request's bytes raised
            results.append(BadImage(400, f"corrupt JPEG: nvJPEG could not decode it: {type(exc).__name__}: {exc}"[:500]))
    return results


def _is_chw3(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == 3 and x.dtype == torch.uint8


# ------------------------------------------------------------------------------------------------- resize
def resize(img, size: tuple[int, int]):
    """Resize to (H, W) with an antialiased bilinear filter, in the decoder's own representation."""
    h, w = size
    if isinstance(img, Image.Image):
        return img.resize((w, h), Image.BILINEAR)
    if isinstance(img, np.ndarray):
        import cv2

        # INTER_AREA is OpenCV's antialiased choice for downscaling; bilinear for upscaling
        shrink = img.shape[0] > h or img.shape[1] > w
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if isinstance(img, torch.Tensor):  # CHW uint8, e.g. on the GPU
        x = img.unsqueeze(0).float()
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8)[0]
    raise TypeError(f"cannot resize a {type(img).__name__}")


# ---------------------------------------------------------------------------------------------- normalize
def to_uint8_chw(img) -> torch.Tensor:
    """Pixels as a CHW uint8 tensor (no copy of the pixel data where the layout allows)."""
    if isinstance(img, Image.Image):
        img = np.array(img)  # a writable copy (Pillow's buffer is read-only)
    if isinstance(img, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if isinstance(img, torch.Tensor):
        return img
    raise TypeError(f"cannot convert a {type(img).__name__} to a tensor")


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float32 (x / 255 - mean) / std, on x's device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {x.dtype}")
    m = torch.tensor(mean, device=x.device).view(3, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(3, 1, 1) * 255
    return (x.float() - m) / s


def to_device(batch: list[torch.Tensor], device: str | torch.device, *, pin_memory: bool = True) -> torch.Tensor:
    """Stack per-request tensors and copy them to ``device``.

    For a CUDA target with ``pin_memory`` the batch is stacked straight into page-locked host memory (from
    PyTorch's caching host allocator, so reused across batches) and DMA'd from there; without it the
    batch is stacked into ordinary pageable memory and ``.to(device)`` lets the driver stage it through its
    own bounce buffer (an extra host copy, synchronous). For a CPU target both are the same: there is no
    copy to a device, so the switch changes nothing on a CPU server.
    """
    if not isinstance(pin_memory, bool):
        raise TypeError(f"pin_memory must be a bool, got {type(pin_memory).__name__}")
    if not batch:
        raise ValueError("to_device needs at least one tensor")
    target = torch.device(device)
    on_host = all(t.device.type == "cpu" for t in batch)
    if target.type == "cuda" and on_host and pin_memory:
        x = torch.empty((len(batch), *batch[0].shape), dtype=batch[0].dtype, pin_memory=True)
        torch.stack(batch, out=x)
        x = x.to(target, non_blocking=True)
        torch.cuda.synchronize(target)
        return x
    return torch.stack(batch).to(target)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a server prepares images: the decoder, DCT-domain reduction, and where normalization runs.

    ``normalize_on="host"`` converts each request to float on the CPU (4 bytes a pixel cross to the
    device); ``"device"`` keeps uint8 until after the copy (1 byte a pixel) and normalizes the batch there.
    ``pin_memory`` stages each batch in page-locked host memory before a CUDA copy (see ``to_device``); a
    CPU server makes no such copy, so there it changes nothing. ``strict`` rejects images libjpeg only
    warns about (a scan cut short), see ``decode``. ``batch_decode`` (with ``decoder="nvjpeg"``) leaves only the
    header checks to each request and decodes, resizes and normalizes the batch on the GPU in one step, the
    pixels never on the host.
    """

    decoder: str = "pil"
    reduced: bool = False
    normalize_on: str = "host"
    max_pixels: int = DEFAULT_MAX_PIXELS
    pin_memory: bool = True
    strict: bool = True  # libjpeg warnings are errors (see ``decode``)
    # with decoder "nvjpeg": decode the whole batch in one nvJPEG call in the inference step (``decode_batch_isolated``)
    # instead of request by request
    batch_decode: bool = False

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; expected one of {', '.join(DECODERS)}")
        if self.normalize_on not in ("host", "device"):
            raise ValueError(f"normalize_on must be 'host' or 'device', got {self.normalize_on!r}")
        if self.max_pixels <= 0:
            raise ValueError("max_pixels must be positive")
        for name in ("pin_memory", "strict", "batch_decode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.batch_decode and self.decoder != "nvjpeg":
            raise ValueError(f"batch_decode decodes on the GPU: it needs decoder 'nvjpeg', got {self.decoder!r}")
