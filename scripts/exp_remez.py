# Reproduces the exp polynomial coefficients in include/mnemo/simd/math.hpp (not used by the
# build or the tests). Needs mpmath from PyPI, e.g. in a venv: python3 -m venv .venv &&
# .venv/bin/pip install mpmath && .venv/bin/python scripts/exp_remez.py 6
# Remez exchange for exp(r) ~ 1 + r + r^2*P(r), P of degree deg, minimising the relative error on [-a, a].
import mpmath as mp
import struct, sys
mp.mp.dps = 40
a = mp.log(2)/2 * mp.mpf('1.0001')
deg = int(sys.argv[1]) if len(sys.argv) > 1 else 4
n = deg + 1  # unknowns
f = lambda r: (mp.exp(r) - 1 - r) / r**2 if r != 0 else mp.mpf(1)/2
w = lambda r: r**2 / mp.exp(r)
def err(c, r):
    P = mp.polyval(c[::-1], r)
    return (1 + r + r**2 * P - mp.exp(r)) / mp.exp(r)
# initial Chebyshev reference
m = n + 1
xs = [a * mp.cos(mp.pi * (m - 1 - i) / (m - 1)) for i in range(m)]
for it in range(30):
    A = mp.matrix(m, m); b = mp.matrix(m, 1)
    for i, x in enumerate(xs):
        for j in range(n):
            A[i, j] = w(x) * x**j
        A[i, n] = (-1)**i
        b[i] = w(x) * f(x)
    sol = mp.lu_solve(A, b)
    c = [sol[j] for j in range(n)]
    E = sol[n]
    # find extrema of err on a fine grid then refine
    N = 4000
    grid = [-a + 2*a*k/N for k in range(N+1)]
    ev = [err(c, x) for x in grid]
    ext = [0]
    for k in range(1, N):
        if (ev[k] - ev[k-1]) * (ev[k+1] - ev[k]) <= 0: ext.append(k)
    ext.append(N)
    # keep alternating set of size m with largest values
    mx = max(abs(ev[k]) for k in ext)
    pts = [(grid[k], ev[k]) for k in ext if abs(ev[k]) > mx * 0.05]
    # merge same-sign neighbours keeping the larger
    merged = []
    for p in pts:
        if merged and mp.sign(merged[-1][1]) == mp.sign(p[1]):
            if abs(p[1]) > abs(merged[-1][1]): merged[-1] = p
        else: merged.append(p)
    while len(merged) > m:
        if abs(merged[0][1]) < abs(merged[-1][1]): merged.pop(0)
        else: merged.pop()
    xs = [p[0] for p in merged]
    maxe = max(abs(p[1]) for p in merged); print(it, mp.nstr(E,6), mp.nstr(maxe,6), len(merged))
print("deg P =", deg, "E =", mp.nstr(E, 6), "max =", mp.nstr(maxe, 6), "in float ulps(2^-23):", mp.nstr(maxe * 2**23, 4))
for j, cj in enumerate(c):
    fl = struct.unpack('f', struct.pack('f', float(cj)))[0]
    print(f"c{j+2} = {mp.nstr(cj, 20)}  float {fl!r}  hex {struct.pack('>f', fl).hex()}  {fl.hex()}")
