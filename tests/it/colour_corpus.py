#!/usr/bin/env python3
"""The colour corpus for tests/it/colour.rs: one 96 x 64 picture in many encodings, and what a
correct decoder must make of each (8-bit sRGB, upright), made by Pillow and LittleCMS (ImageCms).

  colour_corpus.py make DIR         DIR/in/<stem>.<ext>, DIR/ref/<stem>.png, DIR/manifest.json
                                    ({file, stem, kind, max_mean_de, wrong_mean_de, wrong}),
                                    DIR/skipped.json (cases this machine cannot make)
  colour_corpus.py compare DIR OUT  CIEDE2000 of OUT/<stem>.png against each reference (JSON)
  colour_corpus.py bombs DIR        a TIFF and HEICs whose headers claim 50000 (30000) squared
  colour_corpus.py selftest         CIEDE2000 on Sharma's pairs, the P3 profile, the PNG writer

Needs numpy, Pillow (LittleCMS, WebP, AVIF) and pillow_heif. A case whose profile or encoder
is missing is skipped with a warning and listed in skipped.json (the Rust test fails on that
under HOTPIPE_TEST_STRICT=1).

ICC profiles, read from the system (scripts/test.sh installs the packages), never copied here:
  colord/{AdobeRGB1998,ProPhotoRGB,SwappedRedAndGreen}.icc under /usr/share/color/icc: Debian
      colord-data, data/profiles/* CC0-1.0; ICC v4 matrix/TRC.
  ghostscript/sgray.icc (gray, gamma 1.8, v2) and ghostscript/default_cmyk.icc (v2 CMYK LUT
      profile, A2B0..A2B2): Debian libgs-common, Ghostscript's iccprofiles/, AGPL-3+.
  Display P3: no Debian package ships one; p3_icc() writes it (ours, no licence terms).
"""

import io
import json
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

W, H = 96, 64
ICC = Path("/usr/share/color/icc")
PROFILE_FILES = {
    "adobe": ICC / "colord/AdobeRGB1998.icc",
    "prophoto": ICC / "colord/ProPhotoRGB.icc",
    "swapped": ICC / "colord/SwappedRedAndGreen.icc",
    "gray": ICC / "ghostscript/sgray.icc",
    "cmyk": ICC / "ghostscript/default_cmyk.icc",
}

# Mean CIEDE2000 allowed per kind, from measurements: a correct decoder sits far below, and
# each case's likeliest mistake ("wrong_mean_de" in the manifest) at least MARGIN times above.
TOLERANCE = {
    # Lossless without colour management: a copy. Anything above rounding noise is a bug.
    "lossless": 0.05,
    # libjpeg-turbo on both sides (Pillow, turbojpeg) gives the same pixels (0 measured); room
    # for another IDCT or upsampling, far under any colour or orientation mistake.
    "jpeg": 0.5,
    # Matrix/TRC profiles, moxcms 0.8.1 (default options) against LittleCMS 2.19: 0.001 to
    # 0.13 mean (max 1.4) measured; the smallest mistake, alpha P3 read as sRGB, is 2.5.
    "icc": 0.5,
    # The CMYK LUT profile against LittleCMS's relative colorimetric: 0.30 measured (4-D table
    # interpolation differs between CMMs); ignoring the profile is 10.7.
    "cmyk": 1.0,
    # 16 -> 8 bits by rounding is exact (v / 257 is never a tie: 257 is odd), so only noise
    # is allowed; truncation (v >> 8) is one level off in 12% of the samples: 0.05 to 0.07.
    "16bit": 0.01,
    # 16-bit RGBA over white: reducing to 8 bits first, then compositing, is 0.11 from the
    # float composite, and fine; a wrong background or no alpha is 19 and more.
    "alpha16": 0.3,
    # HEVC / AV1 decoded by Debian's libheif 1.15 against pillow_heif's 1.23 (HEIC) or
    # Pillow's libavif (AVIF), measured with heif-convert: HEIC 4:4:4 0.00, 4:2:0 0.01; AVIF
    # 4:4:4 0.12. (AVIF 4:2:0 is 1.6 apart, chroma upsampling: not a colour question.)
    "heif": 0.6,
}
MARGIN = 3


class Skip(Exception):
    """A case that cannot be made here (profile or encoder missing)."""


# ---------------------------------------------------------------- the picture


def content_float():
    """The upright picture, sRGB-encoded floats in [0, 1]: primaries, secondaries, white and
    black with hard edges, skin tones, then a smooth hue x value field crossed by a dotted
    line. Nothing is symmetric, so any flip or rotation shows."""
    img = np.zeros((H, W, 3))
    for i, c in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1)]):
        img[0:16, 12 * i : 12 * i + 12] = c  # and black in the last 12 columns
    skins = [(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (224, 172, 105), (255, 205, 148)]
    for i, c in enumerate(skins):
        img[16:32, 16 * i : 16 * i + 16] = np.array(c) / 255
    y, x = np.mgrid[32:H, 0:W].astype(float)
    val, sat = 1 - 0.75 * (y - 32) / 31, 0.35 + 0.65 * x / (W - 1)
    k = ((x + 0.5) / W * 6)[..., None] + np.array([0, 4, 2])  # HSV, continuous in hue
    chan = 1 - np.clip(np.minimum(k % 6, 4 - k % 6), 0, 1)
    img[32:] = (val * (1 - sat))[..., None] + (val * sat)[..., None] * (1 - chan)
    for t in range(24):
        img[36 + t, 20 + 2 * t] = 0.95
    return img


def q8(f):
    return np.clip(np.rint(f * 255), 0, 255).astype(np.uint8)


def q16(f):
    return np.clip(np.rint(f * 65535), 0, 65535).astype(np.uint16)


def r8(v16):
    """16 -> 8 bits by rounding: round(v / 257)."""
    return np.rint(v16 / 257).astype(np.uint8)


def content8():
    return q8(content_float())


def pil(a, mode=None):
    return Image.fromarray(np.ascontiguousarray(a), mode)


def rgb(img):
    return np.asarray(img.convert("RGB"))


def grey3(g):
    return np.repeat(g[..., None], 3, -1)


def alpha_ramp(top=255):
    """Alpha over its whole range: 0 at the left, opaque at the right, varied by row."""
    y, x = np.mgrid[0:H, 0:W].astype(float)
    return np.rint(top * np.clip(0.85 * x / (W - 1) + 0.15 * y / (H - 1), 0, 1))


def over(c, a, top=255, background=1.0):
    """Straight alpha composited over white (or black), on sRGB-encoded values, to 8 bits."""
    c, a = c.astype(float) / top, a.astype(float)[..., None] / top
    return q8(c * a + background * (1 - a))


# ---------------------------------------------------------------- colour maths

SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
ADOBE_TO_XYZ = np.array([[0.5767309, 0.1855540, 0.1881852], [0.2973769, 0.6273491, 0.0752741],
                         [0.0270343, 0.0706872, 0.9911085]])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
D50 = np.array([0.9642, 1.0, 0.8249])


def srgb_decode(v):
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def lab(rgb8):
    """8-bit sRGB -> linear -> XYZ (D65) -> CIELAB with the D65 white."""
    t = srgb_decode(rgb8.astype(float) / 255) @ SRGB_TO_XYZ.T / SRGB_TO_XYZ.sum(axis=1)
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ciede2000(lab1, lab2):
    """CIEDE2000 (Sharma, Wu, Dalal 2005, eqs. 1-22), elementwise over [..., 3] arrays."""
    (l1, a1, b1), (l2, a2, b2) = np.moveaxis(lab1, -1, 0), np.moveaxis(lab2, -1, 0)
    cbar7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(cbar7 / (cbar7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    zero = c1p * c2p == 0
    dh = h2p - h1p
    dh = np.where(zero, 0, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)))
    dhp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    hs = h1p + h2p
    hbar = np.where(np.abs(h1p - h2p) <= 180, hs / 2, np.where(hs < 360, hs / 2 + 180, hs / 2 - 180))
    hbar = np.where(zero, hs, hbar)
    lbar, cbar = (l1 + l2) / 2, (c1p + c2p) / 2
    cos = lambda deg: np.cos(np.radians(deg))  # noqa: E731
    t = 1 - 0.17 * cos(hbar - 30) + 0.24 * cos(2 * hbar) + 0.32 * cos(3 * hbar + 6) - 0.20 * cos(4 * hbar - 63)
    sl = 1 + 0.015 * (lbar - 50) ** 2 / np.sqrt(20 + (lbar - 50) ** 2)
    sc, sh = 1 + 0.045 * cbar, 1 + 0.015 * cbar * t
    rc = 2 * np.sqrt(cbar**7 / (cbar**7 + 25.0**7))
    rt = -np.sin(np.radians(60 * np.exp(-(((hbar - 275) / 25) ** 2)))) * rc
    dl, dc, dhh = (l2 - l1) / sl, (c2p - c1p) / sc, dhp / sh
    return np.sqrt(dl**2 + dc**2 + dhh**2 + rt * dc * dhh)


def mean_de(a, b):
    return float(ciede2000(lab(a), lab(b)).mean())


# ---------------------------------------------------------------- profiles


def s15(*vs):
    return b"".join(struct.pack(">i", int(round(v * 65536))) for v in vs)


def mluc(text):
    s = text.encode("utf-16-be")
    return b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(s), 28) + s


def p3_icc():
    """Display P3 as an ICC v4 matrix/TRC profile: the P3 primaries with the D65 white, adapted
    to the D50 PCS with Bradford (as Apple's, to 4 decimals); the TRC is sRGB's, parametric."""
    xy = np.array([[0.680, 0.320], [0.265, 0.690], [0.150, 0.060]])
    xyz = np.column_stack([xy[:, 0] / xy[:, 1], np.ones(3), (1 - xy.sum(1)) / xy[:, 1]]).T
    d65 = np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])
    m = xyz * np.linalg.solve(xyz, d65)  # columns: each primary's XYZ at full drive
    chad = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ d65)) @ BRADFORD
    cols = chad @ m
    trc = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + s15(2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    tags = [(b"desc", mluc("Display P3 (hotpipe test)")), (b"cprt", mluc("No copyright, use freely")),
            (b"wtpt", b"XYZ \0\0\0\0" + s15(*D50)), (b"chad", b"sf32\0\0\0\0" + s15(*chad.ravel()))]
    tags += [(s + b"XYZ", b"XYZ \0\0\0\0" + s15(*cols[:, i])) for i, s in enumerate((b"r", b"g", b"b"))]
    tags += [(s + b"TRC", trc) for s in (b"r", b"g", b"b")]
    off, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += struct.pack(">4sII", sig, off + len(data), len(body))
        data += body
    header = struct.pack(">I4sI4s4s4s12s4s28s", off + len(data), b"", 0x04300000, b"mntr", b"RGB ", b"XYZ ",
                         b"", b"acsp", b"") + s15(*D50) + b"\0" * 48
    return header + struct.pack(">I", len(tags)) + table + data


def profile(name):
    """The ICC bytes of a named profile; Skip when this system lacks it."""
    if name == "p3":
        return p3_icc()
    if not PROFILE_FILES[name].is_file():
        raise Skip(f"{PROFILE_FILES[name]} missing (scripts/test.sh installs colord-data, libgs-common)")
    return PROFILE_FILES[name].read_bytes()


def cms(img, src, dst, mode, intent=ImageCms.Intent.PERCEPTUAL):
    """LittleCMS from profile src to dst (ICC bytes, or None: its built-in sRGB). For matrix/TRC
    profiles every intent is relative colorimetric."""
    src, dst = (ImageCms.ImageCmsProfile(io.BytesIO(x)) if x else ImageCms.createProfile("sRGB") for x in (src, dst))
    return ImageCms.profileToProfile(img, src, dst, renderingIntent=intent, outputMode=mode)


# ---------------------------------------------------------------- writers


def png_raw(path, a, colour_type, chunks=()):
    """A PNG at a depth Pillow cannot write (16-bit RGB, RGBA); rows unfiltered."""
    depth = 16 if a.dtype == np.uint16 else 8
    rows = a.astype(">u2" if depth == 16 else np.uint8).reshape(a.shape[0], -1).view(np.uint8)
    idat = zlib.compress(b"".join(b"\0" + r.tobytes() for r in rows), 9)

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + b"".join(chunk(t, d) for t, d in chunks) + chunk(b"IDAT", idat)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))


def tiff_rgb16(path, a):
    """An uncompressed little-endian 16-bit RGB TIFF in one strip (Pillow writes none)."""
    pixels = a.astype("<u2").tobytes()

    def entry(tag, typ, v):  # BitsPerSample (258) is 3 SHORTs: they sit at offset 8
        count, inline = (3, False) if tag == 258 else (1, typ == 3)
        value = struct.pack("<HH", v, 0) if inline else struct.pack("<I", v)
        return struct.pack("<HHI", tag, typ, count) + value

    entries = [(256, 3, W), (257, 3, H), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 16), (277, 3, 3),
               (278, 3, H), (279, 4, len(pixels)), (284, 3, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(entry(*e) for e in entries) + b"\0\0\0\0"
    head = b"II*\0" + struct.pack("<I", 16 + len(pixels)) + struct.pack("<3H", 16, 16, 16) + b"\0\0"
    Path(path).write_bytes(head + pixels + ifd)


SAVE = {"jpg": dict(format="JPEG", quality=95, subsampling=0), "png": dict(format="PNG"),
        "webp": dict(format="WEBP", lossless=True, exact=True), "tif": dict(format="TIFF")}


def save(img, path, ext, **kw):
    img.save(path, **{**SAVE[ext], **kw})


# ---------------------------------------------------------------- cases
# Each maker writes its file and returns (reference, {a plausible mistake: what it gives}).


def untagged(path, ext, **kw):
    save(pil(content8()), path, ext, **kw)
    return rgb(Image.open(path)), {}


def gif(path, _):
    """A palette GIF of two frames, the second very different: the reference is Pillow's own
    decode of the first."""
    second = pil(255 - content8()[::-1]).quantize(256)
    pil(content8()).quantize(256).save(path, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(path) as im:
        ref = rgb(im)
        im.seek(1)
        return ref, {"second frame": rgb(im)}


def tagged(path, ext, name):
    """The picture converted into the profile by LittleCMS and tagged with it; the reference is
    LittleCMS back to sRGB from the pixels Pillow decodes of the file."""
    icc = profile(name)
    save(cms(pil(content8()), None, icc, "RGB"), path, ext, icc_profile=icc)
    im = Image.open(path)
    assert im.info.get("icc_profile") == icc, f"{path}: profile not embedded"
    return rgb(cms(im.convert("RGB"), icc, None, "RGB")), {"stored pixels as sRGB": rgb(im)}


def gray_tagged(path, ext):
    icc = profile("gray")
    save(cms(pil(content8()), None, icc, "L"), path, ext, icc_profile=icc)
    im = Image.open(path)
    assert im.mode == "L" and im.info.get("icc_profile") == icc
    return rgb(cms(im, icc, None, "RGB")), {"gray as sRGB": rgb(im)}


def heif_save(img, path, ext, chroma=444, **kw):
    """HEIC through pillow_heif (x265); AVIF through Pillow's own plugin (libavif): the
    pillow_heif wheel has no AV1 encoder. 4:4:4 but for the one 4:2:0 HEIC (see "heif")."""
    if ext == "heic":
        try:
            import pillow_heif
        except ImportError:
            raise Skip("pillow_heif not installed (scripts/setup.sh installs it)")
        pillow_heif.register_heif_opener()
        img.save(path, format="HEIF", quality=95, chroma=chroma, **kw)
    else:
        from PIL import features

        if not features.check("avif"):
            raise Skip("Pillow built without AVIF")
        img.save(path, format="AVIF", quality=95, subsampling="4:4:4", **kw)


def ycc_mistakes(ref):
    """The easiest HEIF mistakes, simulated: BT.601 YCbCr read as BT.709; full range as limited."""
    m601 = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    kr, kb = 0.2126, 0.0722
    kg = 1 - kr - kb
    m709 = np.array([[kr, kg, kb], [-kr / (2 - 2 * kb), -kg / (2 - 2 * kb), 0.5],
                     [0.5, -kg / (2 - 2 * kr), -kb / (2 - 2 * kr)]])
    ycc = ref.astype(float) / 255 @ m601.T
    limited = (ycc - [16 / 255, 0, 0]) * [255 / 219, 255 / 224, 255 / 224]
    return {"BT.601 read as BT.709": q8(ycc @ np.linalg.inv(m709).T),
            "full range read as limited": q8(limited @ np.linalg.inv(m601).T)}


def heif(path, ext, name=None, chroma=444):
    icc = profile(name) if name else None
    img = pil(content8()) if icc is None else cms(pil(content8()), None, icc, "RGB")
    heif_save(img, path, ext, chroma, **({"icc_profile": icc} if icc else {}))
    im = Image.open(path)
    if icc is None:
        return rgb(im), ycc_mistakes(rgb(im))
    if im.info.get("icc_profile") != icc:
        raise Skip(f"the {ext} encoder did not embed the ICC profile")
    return rgb(cms(im.convert("RGB"), icc, None, "RGB")), {"stored pixels as sRGB": rgb(im)}


def naive_cmyk():
    """The picture as CMYK with full grey component replacement: K carries the darkness."""
    f = content_float()
    k = 1 - f.max(-1, keepdims=True)
    return q8(np.concatenate([np.where(k < 1, (1 - f - k) / np.maximum(1 - k, 1e-9), 0), k], -1))


def adobe_transform(path):
    """The transform byte of the JPEG's APP14 "Adobe" marker, or None."""
    d = Path(path).read_bytes()
    i = d.find(b"\xff\xee")
    return d[i + 15] if i > 0 and d[i + 4 : i + 9] == b"Adobe" else None


def stored_cmyk(path):
    """The CMYK samples as stored: Pillow's JPEG reader inverts all CMYK ("CMYK;I"), marker or
    not, so ask its decoder for the plain raw mode."""
    im = Image.open(path)
    im.tile = [t._replace(args=("CMYK",) + tuple(t.args[1:])) for t in im.tile]
    return np.asarray(im)


def cmyk(path, _, name=None):
    """CMYK JPEGs as Pillow writes them, checked: an APP14 Adobe marker (transform 0) and the
    samples stored inverted, as Photoshop does. Without a profile the reference is Pillow's
    own conversion, (255 - C)(255 - K) / 255 etc."""
    icc = profile(name) if name else None
    img = pil(naive_cmyk(), "CMYK") if icc is None else cms(pil(content8()), None, icc, "CMYK")
    save(img, path, "jpg", **({"icc_profile": icc} if icc else {}))
    assert adobe_transform(path) == 0, f"{path}: no Adobe APP14 marker"
    im, raw = Image.open(path), stored_cmyk(path)
    assert np.array_equal(255 - raw, np.asarray(im)), f"{path}: CMYK not stored inverted"
    wrong = {"Adobe inversion not undone": rgb(pil(raw, "CMYK")), "K ignored": 255 - np.asarray(im)[..., :3]}
    if icc is None:
        return rgb(im), wrong
    # Relative colorimetric (A2B1): LittleCMS's perceptual from this v2 profile to its v4 sRGB
    # adds black point compensation, 1.7 away from both A2B0 and A2B1 as moxcms applies them.
    ref = cms(im, icc, None, "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC)
    return rgb(ref), {**wrong, "profile ignored": rgb(im)}


def sixteen(path, ext, what):
    """16-bit samples of the float picture; the reference rounds them (Pillow truncates)."""
    if what == "gray":
        v = q16(content_float() @ [0.2126, 0.7152, 0.0722])
        png_raw(path, v, 0)
        assert np.array_equal(np.asarray(Image.open(path)), v), "gray16 PNG read back differs"
        return grey3(r8(v)), {"truncated": grey3(v >> 8).astype(np.uint8)}
    v = q16(content_float())
    png_raw(path, v, 2) if ext == "png" else tiff_rgb16(path, v)
    assert np.abs(rgb(Image.open(path)).astype(int) - r8(v)).max() <= 1, f"{path} read back differs"
    return r8(v), {"truncated": (v >> 8).astype(np.uint8)}


def sixteen_adobe(path, _):
    """16-bit Adobe RGB made in float through the matrices (both whites D65: no adaptation).
    The reference is the picture itself, which an exact conversion of these samples back to
    sRGB gives; moxcms through 8 bits measures 0.13 from it, LittleCMS likewise."""
    icc = profile("adobe")
    lin = srgb_decode(content_float()) @ SRGB_TO_XYZ.T @ np.linalg.inv(ADOBE_TO_XYZ).T
    v = q16(np.clip(lin, 0, 1) ** (256 / 563))
    png_raw(path, v, 2, [(b"iCCP", b"ICC\0\0" + zlib.compress(icc))])
    assert mean_de(rgb(cms(pil(r8(v)), icc, None, "RGB")), content8()) < 0.5, "float and LittleCMS disagree"
    return content8(), {"stored pixels as sRGB": r8(v)}


def alpha(path, ext, what):
    """Straight alpha over its whole range; the reference is composited over white after any
    ICC conversion (colour first, then composite)."""
    c, a = content8(), alpha_ramp().astype(np.uint8)
    if what == "la":
        g = np.rint(c @ [0.2126, 0.7152, 0.0722]).astype(np.uint8)
        pil(np.stack([g, a], -1), "LA").save(path, format="PNG")
        return over(grey3(g), a), {"over black": over(grey3(g), a, background=0), "alpha ignored": grey3(g)}
    if what == "rgba16":
        c16, a16 = q16(content_float()), alpha_ramp(65535).astype(np.uint16)
        png_raw(path, np.concatenate([c16, a16[..., None]], -1), 6)
        return over(c16, a16, 65535), {"over black": over(c16, a16, 65535, 0), "alpha ignored": r8(c16)}
    icc = profile("p3") if what == "p3" else None
    stored = c if icc is None else rgb(cms(pil(c), None, icc, "RGB"))
    img = pil(np.concatenate([stored, a[..., None]], -1), "RGBA")
    save(img, path, ext, **({"icc_profile": icc} if icc else {}))
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img)), f"{path}: RGBA not lossless"
    colour = stored if icc is None else rgb(cms(pil(stored), icc, None, "RGB"))
    wrong = {"over black": over(colour, a, background=0), "alpha ignored": colour}
    if icc is not None:
        wrong["composited, profile ignored"] = over(stored, a)
    return over(colour, a), wrong


# The transpose that turns each EXIF orientation upright (as ImageOps.exif_transpose does), and
# the inverse, which makes the stored pixels from the upright picture.
T = Image.Transpose
UPRIGHT = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
           7: T.TRANSVERSE, 8: T.ROTATE_90}
STORE = {**UPRIGHT, 6: T.ROTATE_90, 8: T.ROTATE_270}


def oriented(path, ext, o):
    """Stored pixels such that orientation o shows the upright picture. The reference is
    Pillow's decode turned upright; the mistakes, every other orientation of the same size."""
    ex = Image.Exif()
    ex[0x0112] = o
    save(pil(content8()) if o == 1 else pil(content8()).transpose(STORE[o]), path, ext, exif=ex.tobytes())
    im = Image.open(path)
    ref = rgb(ImageOps.exif_transpose(im))
    assert im.getexif().get(0x0112) == o and ref.shape == (H, W, 3)
    assert ext != "png" or np.array_equal(ref, content8())
    raw = im.convert("RGB")
    others = (k for k in range(1, 9) if k != o)
    return ref, {f"as orientation {k}": rgb(raw if k == 1 else raw.transpose(UPRIGHT[k])) for k in others}


def cases():
    """(stem, ext, kind, maker) for every case; the stems are unique (outputs are <stem>.png)."""
    c = [(f"srgb_{e}", e, "jpeg" if e == "jpg" else "lossless", untagged) for e in ("jpg", "png", "webp")]
    c += [("srgb_bmp", "bmp", "lossless", lambda p, e: untagged(p, "png", format="BMP")),
          ("srgb_gif", "gif", "lossless", gif)]
    for z in ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"):
        kw = {} if z == "raw" else {"compression": z}
        c.append((f"srgb_tif_{z}", "tif", "lossless", lambda p, e, kw=kw: untagged(p, e, **kw)))
    for name in ("p3", "adobe", "prophoto", "swapped"):
        for e in ("jpg", "png") + (("webp", "tif") if name == "adobe" else ()):
            c.append((f"icc_{name}_{e}", e, "icc", lambda p, e, n=name: tagged(p, e, n)))
    c += [(f"icc_gray_{e}", e, "icc", gray_tagged) for e in ("png", "jpg")]
    c += [(f"icc_p3_{e}", e, "heif", lambda p, e: heif(p, e, "p3")) for e in ("heic", "avif")]
    c += [("cmyk_plain_jpg", "jpg", "jpeg", cmyk),
          ("cmyk_icc_jpg", "jpg", "cmyk", lambda p, e: cmyk(p, e, "cmyk"))]
    c += [(f"b16_{w}_{e}", e, "16bit", lambda p, e, w=w: sixteen(p, e, w)) for w, e in
          (("rgb", "png"), ("gray", "png"), ("rgb", "tif"))]
    c += [("b16_adobe_png", "png", "icc", sixteen_adobe)]
    c += [(f"alpha_{w}_{e}", e, k, lambda p, e, w=w: alpha(p, e, w)) for w, e, k in
          (("rgba", "png", "lossless"), ("rgba", "webp", "lossless"), ("la", "png", "lossless"),
           ("rgba16", "png", "alpha16"), ("p3", "png", "icc"))]
    c += [(f"orient{o}_jpg", "jpg", "jpeg", lambda p, e, o=o: oriented(p, e, o)) for o in range(1, 9)]
    c += [("orient6_png", "png", "lossless", lambda p, e: oriented(p, e, 6))]
    c += [(f"plain_{e}", e, "heif", heif) for e in ("heic", "avif")]
    return c + [("plain_heic420", "heic", "heif", lambda p, e: heif(p, e, chroma=420))]


# ---------------------------------------------------------------- commands


def make_case(d, stem, ext, kind, maker):
    """Write one case: its manifest entry, after checking its tolerance can catch its mistakes."""
    path = d / "in" / f"{stem}.{ext}"
    ref, wrongs = maker(path, ext)
    assert ref.shape == (H, W, 3) and ref.dtype == np.uint8, stem
    pil(ref).save(d / "ref" / f"{stem}.png")
    entry = {"file": path.name, "stem": stem, "kind": kind, "max_mean_de": TOLERANCE[kind]}
    same = {k: mean_de(ref, v) for k, v in wrongs.items() if v.shape == ref.shape}
    if same:
        worst = min(same, key=same.get)
        entry.update(wrong_mean_de=round(same[worst], 3), wrong=worst)
        assert same[worst] > MARGIN * entry["max_mean_de"], f"{stem}: {worst} gives only {same[worst]:.3f}"
    print(f"{stem:28} {kind:8} tol {entry['max_mean_de']:<5} wrong {entry.get('wrong_mean_de', '-'):>7}"
          f" ({entry.get('wrong', 'no alternative')})", file=sys.stderr)
    return entry


def make(d):
    d = Path(d)
    (d / "in").mkdir(parents=True, exist_ok=True)
    (d / "ref").mkdir(exist_ok=True)
    manifest, skipped = [], []
    for stem, ext, kind, maker in cases():
        try:
            manifest.append(make_case(d, stem, ext, kind, maker))
        except Skip as e:
            print(f"WARNING: skipped {stem}: {e}", file=sys.stderr)
            (d / "in" / f"{stem}.{ext}").unlink(missing_ok=True)
            skipped.append({"stem": stem, "reason": str(e)})
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (d / "skipped.json").write_text(json.dumps(skipped, indent=1))


def psnr(a, b):
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return None if mse == 0 else round(float(10 * np.log10(255**2 / mse)), 2)  # None: identical


def compare(d, out):
    d, out, res = Path(d), Path(out), {}
    for e in json.loads((d / "manifest.json").read_text()):
        ref, got = rgb(Image.open(d / "ref" / f"{e['stem']}.png")), out / f"{e['stem']}.png"
        if not got.is_file():
            res[e["stem"]] = {"missing": True}
            continue
        g = rgb(Image.open(got))
        if g.shape != ref.shape:
            res[e["stem"]] = {"size_ok": False, "size": [g.shape[1], g.shape[0]]}
            continue
        de = ciede2000(lab(ref), lab(g))
        res[e["stem"]] = {"mean_de": round(float(de.mean()), 4), "max_de": round(float(de.max()), 3),
                          "psnr": psnr(ref, g), "size_ok": True}
    print(json.dumps(res, indent=1))


def bombs(d):
    """Tiny files whose headers claim 50000 x 50000: a decoder must refuse them from the header,
    before allocating. libheif refuses over 32768 x 32768 itself ("Security limit exceeded"),
    so a 30000 x 30000 HEIC also checks that hotpipe's own limit (16384) is applied."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pil(content8()[:8, :8]).save(buf, format="TIFF")
    t = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", t, 4)[0]
    for at in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", t, ifd)[0], 12):
        tag, typ = struct.unpack_from("<HH", t, at)
        # ImageWidth, ImageLength, and RowsPerStrip: one strip, as the single StripOffsets
        # entry says (else the strip count is inconsistent, a format error, not a bomb).
        if tag in (256, 257, 278):
            struct.pack_into("<H" if typ == 3 else "<I", t, at + 8, 50000)
    (d / "bomb_tiff.tif").write_bytes(bytes(t))
    try:
        heif_save(pil(content8()), d / "heic.tmp", "heic")
    except Skip as e:
        print(f"WARNING: skipped the HEIC bombs: {e}", file=sys.stderr)
        return
    heic = (d / "heic.tmp").read_bytes()
    (d / "heic.tmp").unlink()
    for name, side in (("bomb_heic.heic", 50000), ("bomb_heic30k.heic", 30000)):
        b, i = bytearray(heic), heic.find(b"ispe")  # 'ispe': version/flags, width, height
        assert i > 0
        while i >= 0:
            b[i + 8 : i + 16] = struct.pack(">II", side, side)
            i = heic.find(b"ispe", i + 1)
        (d / name).write_bytes(bytes(b))


def selftest():
    # Sharma, Wu, Dalal (2005), table 1: pairs 1, 7, 13, 15, 17, 19, 21, 25, 29, 34. (Pair 14
    # has its hues exactly 180 degrees apart, so floating point picks either branch.)
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
             ((50, 2.49, -0.001), (50, -2.49, 0.0011), 7.2195),
             ((50, 2.5, 0), (73, 25, -18), 27.1492), ((50, 2.5, 0), (56, -27, -3), 31.9030),
             ((50, 2.5, 0), (50, 3.1736, 0.5854), 1.0000),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
             ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
             ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441)]
    lab1, lab2 = (np.array([p[i] for p in pairs], float) for i in (0, 1))
    got = ciede2000(lab1, lab2)
    assert np.allclose(got, [p[2] for p in pairs], atol=1e-4) and np.allclose(ciede2000(lab2, lab1), got), got
    p3 = p3_icc()
    px = rgb(cms(pil(np.array([[[255, 0, 0], [128, 128, 128], [255, 255, 255]]], np.uint8)), p3, None, "RGB"))
    px = px[0]
    assert px[0][0] == 255 and px[0][1:].max() <= 2, px  # P3 red is outside sRGB: clipped
    assert np.ptp(px[1]) <= 1 and abs(int(px[1][0]) - 128) <= 1 and px[2].min() >= 254, px
    green = rgb(cms(pil(np.array([[[0, 255, 0]]], np.uint8)), None, p3, "RGB"))[0, 0]
    assert 150 < green[1] < 255 and green[0] > 50, green  # sRGB green lies inside P3
    v, tmp = q16(content_float()), Path(tempfile.mkdtemp()) / "gray16.png"
    png_raw(tmp, v[..., 0], 0)
    assert np.array_equal(np.asarray(Image.open(tmp)), v[..., 0]), "the PNG writer"
    shutil.rmtree(tmp.parent)
    print(f"selftest ok: CIEDE2000 on {len(pairs)} Sharma pairs; P3 red -> {px[0]}, grey -> {px[1]}")


if __name__ == "__main__":
    commands = {("make", 1): make, ("compare", 2): compare, ("bombs", 1): bombs, ("selftest", 0): selftest}
    command = commands.get((sys.argv[1] if len(sys.argv) > 1 else "", len(sys.argv) - 2))
    if command is None:
        sys.exit(__doc__)
    command(*sys.argv[2:])
