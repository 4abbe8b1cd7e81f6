#!/usr/bin/env python3
"""Generates docs/errors.md: what each public entry point of mnemo checks and the mnemo::error it
throws, read from the detail::require / detail::fail / require_shape / require_data / require_disjoint calls
in include/mnemo/**, and the rules that hold for every entry point (aliasing, zero sizes, ranges).

    /usr/bin/python3 scripts/error_table.py            # rewrites docs/errors.md
    /usr/bin/python3 scripts/error_table.py --check    # exit 1 if docs/errors.md is out of date

For every call the table gives the function it sits in (entry point or the shared check helper
the entry points call), the condition that must hold, and the message with its runtime pieces in
braces; `fn` is the entry point's name (e.g. "attention::flash"), which every message starts with.
The second table lists, per entry point, the shared helpers it calls.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "include" / "mnemo"
OUT = ROOT / "docs" / "errors.md"

CALL = re.compile(r"(?:mnemo::)?(?:detail::)?\b(require_shape|require_data|require_disjoint|require|fail)\(")
# A function definition opening at the start of a line (after templates/qualifiers), e.g.
#   void flash(view<const float, 4> q, ...   or   inline dims check_args(const char* fn, ...
DEF = re.compile(r"^(?:  )?(?:template <[^>]*>\s*)?(?:inline |static |constexpr |\[\[noreturn\]\] )*"
                 r"[\w:<>,\*& ]+?\b([a-z_][a-z0-9_]*)\(")
KEYWORDS = {"if", "for", "while", "switch", "return", "require", "fail", "require_shape", "require_data",
            "require_disjoint", "static_assert", "sizeof", "decltype", "assert"}
# Check helpers of core/ that are also keywords above: their definitions (a line that starts with
# `void`) still open a function.
HELPER_DEFS = {"require_shape", "require_data", "require_disjoint"}


def balanced_args(text, start):
    """Arguments of the call whose '(' is at text[start - 1]; returns (args, end)."""
    depth, i, cur, args, in_str = 1, start, [], [], None
    while i < len(text):
        c = text[i]
        if in_str:
            cur.append(c)
            if c == "\\":
                cur.append(text[i + 1])
                i += 1
            elif c == in_str:
                in_str = None
        elif c in "\"'":
            in_str = c
            cur.append(c)
        elif c in "([{<" and not (c == "<" and text[i + 1:i + 2] in (" ", "=")):
            depth += c != "<"
            cur.append(c)
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return args, i + 1
            cur.append(c)
        elif c == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    return args, i


def message(parts):
    out = []
    for p in parts:
        p = " ".join(p.split())
        m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', p)
        if m:
            out.append(m.group(1).replace("\\\\", "\\"))
        else:
            out.append("{" + p + "}")
    return "".join(out)


def enclosing_function(lines, lineno):
    for j in range(lineno, -1, -1):
        line = lines[j]
        if line.lstrip().startswith("//"):
            continue
        m = DEF.match(line)
        if m and not line.startswith("    "):
            if m.group(1) not in KEYWORDS:
                return m.group(1)
            if m.group(1) in HELPER_DEFS and re.match(r"\s*void\s", line):
                return m.group(1)
    return "?"


def md(s):
    return s.replace("|", "\\|").replace("\n", " ")


def scan():
    rows = {}   # header -> [(function, condition, message)]
    calls = {}  # header -> {entry function: set(helpers)}
    helpers = set()
    for path in sorted(INCLUDE.rglob("*.hpp")):
        rel = path.relative_to(ROOT / "include").as_posix()
        text = path.read_text()
        lines = text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        for m in CALL.finditer(text):
            if text[max(0, m.start() - 8):m.start()].rstrip().endswith(("void", "[[noreturn]]")):
                continue  # the definitions in core/error.hpp
            lineno = next(i for i in range(len(offsets)) if offsets[i + 1] > m.start())
            if lines[lineno].lstrip().startswith("//"):
                continue
            args, _ = balanced_args(text, m.end())
            kind = m.group(1)
            func = enclosing_function(lines, lineno)
            if kind == "require" and args:
                cond, msg = " ".join(args[0].split()), message(args[1:])
            elif kind == "fail":
                cond, msg = "(always, on this branch)", message(args)
            elif kind == "require_shape" and len(args) >= 4:
                name = message([args[1]])
                want = " ".join(args[3].split())
                if want.startswith("{") and want.endswith("}"):
                    want = "[" + want[1:-1] + "]"
                cond = f"{name}.shape() == {want}"
                dims = message([args[4]]) if len(args) > 4 else ""
                msg = "{fn}: " + f"{name} must have shape {want}{dims}, got {{shape}}"
            elif kind == "require_data" and len(args) >= 3:
                name = message([args[1]])
                dims = message([args[3]]) if len(args) > 3 else ""
                cond = f"{name} has data, or no elements"
                msg = "{fn}: " + f"{name}{dims} must be a view of memory, got a null view of shape {{shape}}"
            elif kind == "require_disjoint" and len(args) >= 5:
                a, b = message([args[1]]), message([args[3]])
                note = message([args[5]]) if len(args) > 5 else ""
                cond = f"!overlaps({a}, {b})"
                msg = "{fn}: " + f"{a} {{shape}} and {b} {{shape}} must not overlap in memory, got overlapping views{note}"
            else:
                continue
            rows.setdefault(rel, []).append((func, cond, msg))
            if func.startswith("check") or func in ("validate", "require_shape"):
                helpers.add(func)
        for h in re.findall(r"\b(check_[a-z_]+|validate)\(", text):
            helpers.add(h)
    # Which helper each function calls.
    for path in sorted(INCLUDE.rglob("*.hpp")):
        rel = path.relative_to(ROOT / "include").as_posix()
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            for h in re.findall(r"\b(check_[a-z_]+|validate)\(", line):
                if line.lstrip().startswith("//"):
                    continue
                f = enclosing_function(lines, i)
                if f != h and f not in helpers and f != "?":
                    calls.setdefault(rel, {}).setdefault(f, set()).add(h)
    return rows, calls


HEADER = """# Errors: what each entry point checks

Every public entry point validates its arguments once, at the boundary, and throws
`mnemo::error` (derived from `std::invalid_argument`, core/error.hpp) on bad input; nothing is
written before the checks pass. A message names the entry point, the argument, the expected and
the actual value, e.g.

    attention::decode: q.shape[2] (Lq) must be <= 16 (decode_max_rows; use a prefill kernel for more rows), got 17

Generated from the `detail::require` / `detail::fail` / `detail::require_shape` /
`detail::require_data` / `detail::require_disjoint` calls in `include/mnemo/**` by
`scripts/error_table.py` (the rules below are its header text); regenerate after changing a check:

    /usr/bin/python3 scripts/error_table.py            # rewrites this file
    /usr/bin/python3 scripts/error_table.py --check    # fails if it is out of date

Reading the tables: *function* is where the check sits, either the entry point itself or a shared
helper (`check_args`, `check_common`, ...) that the entry points of the second table call; `fn` is
the calling entry point's name, which starts every message; `{...}` is a value filled in at run time.

## Aliasing: which arguments may share memory

Two views *overlap* when their memory ranges, from the first element to the end of the last,
intersect (`mnemo::overlaps`, core/tensor.hpp). The check is on ranges, so two interleaved views of
one buffer (q and k of a packed `[B, L, 3, H, D]` qkv tensor) overlap even if no element is shared.
Inputs may overlap each other freely (k and v may be one tensor). For outputs:

- Attention, every entry point that takes `q, k, v, out, lse` (`attention::reference`, `flash`,
  `decode`, `attend`, `sparse::attention`, `topk_attention`, `loki_attention`, `retrieval_decode`,
  `quest_decode`, and their `reference_*` forms): `out` and `lse` must not overlap `k` or `v` (every
  query row reads all of them); `out` may be `q` itself, the same view, in place (each query row is
  read before its output row is written), but must not overlap `q` in any other way; `lse` overlaps
  nothing. With `column_sums` wanted (reference, flash, decode) `out` may not be `q` even in place
  (flash computes the sums from q after out is written) and `column_sums.sums` overlaps nothing.
  Checked, `attention/common.hpp` `check_aliasing` and `attention/reference.hpp` `check_column_sums`.
  The backward passes (`flash_backward`, `reference_backward`) take the forward's `out` and
  `lse` as inputs; their gradients `dq, dk, dv` must overlap each other and every input (not
  checked).
- `attention::merge`: `out` and `lse` may be the same views as `out_a`/`lse_a` or `out_b`/`lse_b`
  (N-way: as one of the parts), in place; no other overlap (not checked: the rows are merged one at
  a time, so only a partial overlap can go wrong).
- `kvcache::decode`, `kvcache::reference::decode`: `out`, `lse` and `column_sums.sums` overlap
  neither `q` nor each other (checked). The cache's own storage cannot alias a view.
- Linear family (every member, every form, and the `*_step` entry points): `o` overlaps none of
  `q`, `k`, `v`, and `state` (read and written) overlaps none of `o`, `q`, `k`, `v` (checked,
  `linear/common.hpp` `check_common`): the chunked form reads a chunk's inputs after writing rows of
  `o`, and `form::automatic` picks the form from L, so the rule does not depend on the form. Gates
  (`g`, `beta`, `gamma`) must not overlap `o` or `state` either (not checked).
- Everything else (memory modules, policies, `kvcache::layer_cache` members, rope): outputs
  overlap no input, unless the function says "in place" (rope rotates `x` in place).

## Sizes and ranges

- Zero sizes: a zero-size tensor owns no buffer (null data), and is accepted exactly where a
  zero-size view of real memory is: batch, sequence lengths, `n` of `append`, merge parts. A null
  view *with* elements is rejected, naming the argument and its shape; a default-constructed view
  is a zero-size view, so the shape checks name it. Optional outputs (`lse`, `state`, column sums)
  are "not wanted" when null.
- Sizes: `tensor` throws `mnemo::error` when the byte count of its shape overflows int64 or the
  allocation fails (never a null buffer with elements); `kvcache::layer_cache` reports the
  configuration that could not be allocated. `view::narrow` checks `start + len <= extent` without
  overflow.
- Positions: `kvcache::layer_cache::append` takes positions `< INT64_MAX`, so `next_position()` (the
  largest + 1) always fits.
- Quantized storage (`int8`, `int4`): every appended (or re-rotated) value must be finite with
  `|x| <= quant::max_magnitude` (FLT_MAX / 2), so a group's range `max - min` and every dequantized
  value stay finite floats; the f32, f16 and bf16 kinds store anything.
- Masks: `sliding_window{size}` works with distances, never `qp - size`, so any positive size is
  valid and one larger than the sequence is the same as `causal{}`, also with Lq > Lk.
- Threads: any `threads` request is clamped to `max_threads_per_processor` (8) per processor and to
  `OMP_THREAD_LIMIT` (`resolve_threads`, core/parallel.hpp); results never depend on the count.
- `attention::attend` rejects a `path` value that is not one of the enumerators.

## Numerical behaviour that is not an error

Checked by `tests/reliability/extremes_test.cpp`:

- A row with no visible key (masks, `-inf` score biases, an empty kNN memory) gives out = 0 and
  lse = -inf, never NaN. Gates of `-inf` (decay 0) and `0` (no decay) are exact.
- Finite inputs of extreme size (logits near +-1e4, scales from 1e-30 to 1e6, denormals, f16
  storage up to 65504) give the reference's answer.
- Finite inputs whose scores are finite give finite results on every attention path, even when
  f32 arithmetic overflows on the way (tests/reliability/bad_input_test.cpp, defects 6 and 7):
  flash computes a row whose f32 out or lse is not finite again in double (the reference's row),
  and the split-KV engine (decode, kvcache::decode, paged) scores a chunk whose partial lse is NaN
  again from q scaled by 2^-64 (then 2^-128). A score is accurate to f32 rounding of its products,
  about 6e-8 * sum_c |q_c k_c|: q = 1e19 against k = +-3e19 (true score 0) gives an lse off by
  about 1e31 while out stays exact. V up to FLT_MAX is fine (flash's unnormalised accumulator is
  recomputed in double when it overflows). The chunk merge sums in double, so a decode over 2M
  keys of constant v gives v to 1 ulp (defect 14). `inf` stored in V (an f16 overflow) reaches
  exactly the outputs that read it.
- NaN in a data input (q, k, v, keys, queries) never crashes and propagates to the outputs that
  depend on it. NaN in a gate, beta, gamma, learning rate or scale is rejected (tables below).
- NaN in inputs propagates, never crashes: a NaN in a query, key or value reaches the rows that
  see it as NaN output and NaN lse, on every attention path (reference, flash, split-KV decode,
  kvcache::decode, merge), tested in tests/reliability/extremes_test.cpp and fuzzed.
- Known gaps:
  - The chunked form of the linear family lets a NaN at token t also reach the earlier tokens of
    t's chunk (its masked intra-chunk product computes 0 * NaN); earlier chunks stay clean, and the
    recurrent form never looks back (linear/common.hpp).
  - `attention::flash` and `attention::decode`: a NaN in a value row whose key is masked inside a
    partially visible tile makes the rows of that tile NaN (0 * NaN in the probability-value
    product), where the reference, which skips masked keys, stays clean. Masked keys with NaN
    keys, and NaN values of fully masked tiles, do not leak.
"""


def render(rows, calls):
    out = [HEADER]
    out.append("## Entry points and the shared checks they call\n")
    out.append("| header | function | shared checks called |")
    out.append("|---|---|---|")
    for rel in sorted(calls):
        for f in sorted(calls[rel]):
            out.append(f"| `{rel}` | `{f}` | {', '.join(f'`{h}`' for h in sorted(calls[rel][f]))} |")
    out.append("")
    out.append("## Checks\n")
    for rel in sorted(rows):
        out.append(f"### `{rel}`\n")
        out.append("| function | must hold | error message |")
        out.append("|---|---|---|")
        seen = set()
        for func, cond, msg in rows[rel]:
            key = (func, cond, msg)
            if key in seen:
                continue
            seen.add(key)
            out.append(f"| `{func}` | `{md(cond)}` | {md(msg)} |")
        out.append("")
    return "\n".join(out)


def main():
    rows, calls = scan()
    text = render(rows, calls)
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/errors.md is out of date: run /usr/bin/python3 scripts/error_table.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    n = sum(len(r) for r in rows.values())
    print(f"wrote {OUT.relative_to(ROOT)}: {n} checks in {len(rows)} headers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
