#!/usr/bin/env bash
# Renders `cacheclear demo --report` in a real browser (headless Chromium, Debian's `chromium`
# package, installed if missing) and checks that the screenshot is not blank: at least 2% of its
# pixels are not white, and both strategies' colours (ttl-only red, cacheclear blue) are drawn.
#
#   scripts/check-report.sh [CACHECLEAR_BINARY]   # default target/debug/cacheclear
#
# Leaves the report and the screenshot in $OUT (default a temp dir) and prints their paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/cacheclear}"
out="${OUT:-$(mktemp -d /tmp/cacheclear-report.XXXXXX)}"
if ! command -v chromium >/dev/null 2>&1; then
  echo "check-report: installing Debian's chromium (headless screenshots)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
"$bin" demo --duration 4 --shoppers 16 --products 2000 --report "$out/report.html" >"$out/demo.txt"
# --no-sandbox: as root, Chromium refuses to start its sandbox.
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=820,1300 \
  --screenshot="$out/report.png" "file://$out/report.html" >/dev/null 2>&1
python3 - "$out/report.png" <<'PY'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, ihdr = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        ihdr = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
w, h, depth, colour = ihdr[:4]
assert depth == 8 and colour in (2, 6), f"unexpected PNG format {ihdr}"
bpp = 3 if colour == 2 else 4
raw, stride = zlib.decompress(idat), w * bpp
prev, rows, i = bytearray(stride), [], 0
for _ in range(h):
    f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
    i += 1 + stride
    for x in range(stride):
        a = line[x - bpp] if x >= bpp else 0
        b = prev[x]
        c = prev[x - bpp] if x >= bpp else 0
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    rows.append(line)
    prev = line
ink = red = blue = 0
for line in rows:
    for x in range(0, stride, bpp):
        r, g, b = line[x], line[x + 1], line[x + 2]
        if r < 240 or g < 240 or b < 240:
            ink += 1
        if r > 180 and g < 90 and b < 90:
            red += 1
        if b > 150 and r < 80 and g < 160:
            blue += 1
share = ink / (w * h)
print(f"check-report: {w}x{h} screenshot, {share:.1%} of pixels drawn, {red} red, {blue} blue")
assert share > 0.02, "the page rendered (nearly) blank"
assert red > 50 and blue > 50, "a strategy's series is missing from the rendering"
PY
echo "check-report: ok: $out/report.html, $out/report.png"
