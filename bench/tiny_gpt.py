"""The book's tiny GPT end to end, with fastembed's TokenPositionEmbedding as its first layer.

    python -m bench.tiny_gpt                                # time a training step, train, sample
    python -m bench.tiny_gpt --check-reference --steps 3    # PyTorch against the scalar reference

The model is the book's (microgpt's): vocabulary from the corpus (BOS last, also
the end mark), 32 dims, 16 positions, RMSNorm without gain (eps 1e-5) after the
embedding and before attention and before the MLP of each of 2 layers, 4 causal
heads of dim 8, a ReLU MLP 32 -> 128 -> 32, an untied output head, mean
cross-entropy over one sentence per step, and the book's Adam (lr 0.01 linearly
to 0, betas (0.85, 0.99), eps 1e-8). It is written twice: microgpt style on the
scalar `fastembed.reference.Value`, position by position with a key/value
cache; and in PyTorch on whole sentences, its first layer either
`fastembed.torch.TokenPositionEmbedding` or two `torch.nn.Embedding`s.

The corpus is made here: grade-1 sentences from a small template grammar.
"""
import argparse
import contextlib
import gc
import random
import statistics
import sys
import time

import numpy as np

import fastembed as fe
from fastembed import reference
from fastembed.reference import Value

N_EMBD, BLOCK_SIZE, N_LAYER, N_HEAD = 32, 16, 2, 4
HEAD_DIM = N_EMBD // N_HEAD
MLP_DIM = 4 * N_EMBD
RMS_EPS = 1e-5
LR, BETAS, ADAM_EPS = 0.01, (0.85, 0.99), 1e-8
INIT_STD = 0.08
TOLERANCE = 1e-4  # --check-reference: losses must agree this closely at every step

# ---------------------------------------------------------------- the corpus: grade-1 sentences

NAMES = ["tom", "ann", "sam", "mom", "dad", "the boy", "the girl", "my friend"]
ANIMALS = ["cat", "dog", "pig", "hen", "fox", "cow", "duck", "frog", "fish", "bird", "bug"]
THINGS = ["ball", "hat", "box", "cup", "bus", "car", "kite", "book", "cake", "bed", "toy", "tree", "sun"]
ADJECTIVES = ["big", "small", "red", "blue", "green", "hot", "wet", "fun", "sad", "happy", "little", "fast"]
TRANSITIVE = {"see": "sees", "like": "likes", "have": "has", "want": "wants", "get": "gets", "find": "finds"}
INTRANSITIVE = {"run": "runs", "sit": "sits", "jump": "jumps", "play": "plays", "nap": "naps", "hop": "hops"}
PLACES = ["in the park", "on the mat", "at home", "in the box", "on the bed", "by the tree", "in the sun",
          "up the hill", "to school"]
PRONOUNS = ["i", "we", "you", "they"]


def make_sentence(rng):
    """One sentence from the grammar (lower case words, no punctuation: the book's model is word level)."""
    pick = rng.choice
    noun = lambda: pick(ANIMALS + THINGS)  # noqa: E731
    det = lambda: pick(["a", "the", "my"])  # noqa: E731
    kind = rng.randrange(9)
    if kind == 0:
        return f"{pick(NAMES)} {pick(list(TRANSITIVE.values()))} {det()} {pick(ADJECTIVES)} {noun()}"
    if kind == 1:
        return f"the {pick(ANIMALS)} {pick(list(INTRANSITIVE.values()))} {pick(PLACES)}"
    if kind == 2:
        return f"{pick(PRONOUNS)} {pick(list(TRANSITIVE))} {det()} {pick(ADJECTIVES)} {noun()}"
    if kind == 3:
        return f"the {noun()} is {pick(ADJECTIVES)}"
    if kind == 4:
        return f"{pick(PRONOUNS)} can {pick(list(INTRANSITIVE))} {pick(PLACES + ['fast', 'now', 'today'])}"
    if kind == 5:
        return f"look at the {pick(ADJECTIVES)} {noun()}"
    if kind == 6:
        first, second = rng.sample(NAMES[:5], 2)
        return f"{first} and {second} {pick(list(INTRANSITIVE))} {pick(PLACES)}"
    if kind == 7:
        return f"{pick(NAMES)} {pick(list(INTRANSITIVE.values()))} with the {pick(ANIMALS)}"
    return f"{pick(NAMES + ['the ' + a for a in ANIMALS])} {pick(list(INTRANSITIVE.values()))}"


def make_corpus(size=1200, seed=0):
    """size distinct sentences in a fixed random order."""
    rng = random.Random(seed)
    seen = {}
    while len(seen) < size:
        seen.setdefault(make_sentence(rng), None)
    sentences = list(seen)
    rng.shuffle(sentences)
    return sentences


class Tokenizer:
    """Word ids in sorted order, then BOS (the book's: BOS is the last id and doubles as the end)."""

    def __init__(self, sentences):
        self.words = sorted({w for s in sentences for w in s.split()})
        self.bos = len(self.words)
        self.vocab_size = self.bos + 1
        self.index = {w: k for k, w in enumerate(self.words)}

    def encode(self, sentence):
        """[BOS, words..., BOS]: BOS at both ends."""
        return [self.bos] + [self.index[w] for w in sentence.split()] + [self.bos]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if i != self.bos)


# ---------------------------------------------------------------- weights

def init_weights(vocab_size, seed=0):
    """The book's init (Gaussian, std 0.08), rounded to float32 so every model starts from the same numbers."""
    rng = np.random.default_rng(seed)
    shapes = {"wte": (vocab_size, N_EMBD), "wpe": (BLOCK_SIZE, N_EMBD)}
    for i in range(N_LAYER):
        shapes.update({f"layer{i}.wq": (N_EMBD, N_EMBD), f"layer{i}.wk": (N_EMBD, N_EMBD),
                       f"layer{i}.wv": (N_EMBD, N_EMBD), f"layer{i}.wo": (N_EMBD, N_EMBD),
                       f"layer{i}.fc1": (MLP_DIM, N_EMBD), f"layer{i}.fc2": (N_EMBD, MLP_DIM)})
    shapes["lm_head"] = (vocab_size, N_EMBD)
    return {name: (rng.standard_normal(shape) * INIT_STD).astype(np.float32) for name, shape in shapes.items()}


def lr_at(step, num_steps):
    return LR * (1 - step / num_steps)


# ---------------------------------------------------------------- the scalar model (microgpt style)

@contextlib.contextmanager
def gc_paused():
    """Python's cyclic GC off meanwhile: it would rescan the growing graph of Values and double a step's time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def linear(x, w):
    return [sum(wi * xi for wi, xi in zip(row, x)) for row in w]


def softmax(logits):
    top = max(v.data for v in logits)
    exps = [(v - top).exp() for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def rmsnorm(x):
    scale = (sum(xi * xi for xi in x) / len(x) + RMS_EPS) ** -0.5
    return [xi * scale for xi in x]


class ScalarGPT:
    """The book's model on `reference.Value`.

    first_layer "reference": `reference.TokenPositionEmbedding` (pure Python, float64 Values);
    "fastembed": fastembed's layer through `to_values` (float32 kernels, trained by fastembed.optim.Adam).
    """

    def __init__(self, weights, first_layer="reference"):
        self.first_layer = first_layer
        if first_layer == "reference":
            self.embedding = reference.TokenPositionEmbedding(0, 0, N_EMBD)
            self.embedding.token = reference.Embedding.from_rows(weights["wte"].tolist())
            self.embedding.position = reference.Embedding.from_rows(weights["wpe"].tolist())
            tables = [self.embedding.token.weight, self.embedding.position.weight]
            self.embedding_optimizer = None
        else:
            self.embedding = fe.TokenPositionEmbedding.from_pretrained(weights["wte"], weights["wpe"])
            tables = []
            self.embedding_optimizer = fe.optim.Adam(self.embedding.parameters(), LR, BETAS, ADAM_EPS)
        self.w = {name: [[Value(x) for x in row] for row in w.tolist()]
                  for name, w in weights.items() if name not in ("wte", "wpe")}
        self.params = [v for table in tables + list(self.w.values()) for row in table for v in row]
        self.m = [0.0] * len(self.params)
        self.v = [0.0] * len(self.params)
        self.embedding_seconds = 0.0  # the first layer: forward, and the bridge's backward, summed over calls

    def embed(self, ids):
        t0 = time.perf_counter()
        if self.first_layer == "reference":
            hidden = self.embedding(ids)
        else:
            hidden = self.embedding.to_values(ids)
            self._time_backward(hidden)
        self.embedding_seconds += time.perf_counter() - t0
        return hidden

    def _time_backward(self, hidden):
        """Time the bridge's backward too: wrap the one hook its Values share."""
        hook = hidden[0][0].on_backward

        def timed_hook():
            t0 = time.perf_counter()
            hook()
            self.embedding_seconds += time.perf_counter() - t0

        for row in hidden:
            for v in row:
                v.on_backward = timed_hook

    def logits_at(self, x, keys, values):
        """The logits for one position, its keys and values appended to the caches."""
        w = self.w
        x = rmsnorm(x)
        for li in range(N_LAYER):
            residual = x
            x = rmsnorm(x)
            q, k, v = (linear(x, w[f"layer{li}.{name}"]) for name in ("wq", "wk", "wv"))
            keys[li].append(k)
            values[li].append(v)
            attended = []
            for h in range(N_HEAD):
                lo, hi = h * HEAD_DIM, (h + 1) * HEAD_DIM
                scores = [sum(qi * ki for qi, ki in zip(q[lo:hi], kt[lo:hi])) / HEAD_DIM**0.5 for kt in keys[li]]
                weights = softmax(scores)
                attended.extend(sum(a * vt[j] for a, vt in zip(weights, values[li])) for j in range(lo, hi))
            x = [a + b for a, b in zip(linear(attended, w[f"layer{li}.wo"]), residual)]
            residual = x
            x = [xi.relu() for xi in linear(rmsnorm(x), w[f"layer{li}.fc1"])]
            x = [a + b for a, b in zip(linear(x, w[f"layer{li}.fc2"]), residual)]
        return linear(x, w["lm_head"])

    def loss(self, tokens):
        """Mean cross-entropy of predicting tokens[1:] from tokens[:-1]."""
        hidden = self.embed(tokens[:-1])
        keys, values = [[] for _ in range(N_LAYER)], [[] for _ in range(N_LAYER)]
        losses = [-softmax(self.logits_at(x, keys, values))[target].log()
                  for x, target in zip(hidden, tokens[1:])]
        return sum(losses) / len(losses)

    def step(self, tokens, step, num_steps):
        """One training step (the book's); returns the loss before the update."""
        with gc_paused():
            loss = self.loss(tokens)
            loss.backward()  # with first_layer "fastembed", this also fills the layer's token.grad and position.grad
        lr = lr_at(step, num_steps)
        b1, b2 = BETAS
        for i, p in enumerate(self.params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * p.grad
            self.v[i] = b2 * self.v[i] + (1 - b2) * p.grad**2
            m_hat = self.m[i] / (1 - b1 ** (step + 1))
            v_hat = self.v[i] / (1 - b2 ** (step + 1))
            p.data -= lr * m_hat / (v_hat**0.5 + ADAM_EPS)
            p.grad = 0.0
        if self.embedding_optimizer is not None:
            self.embedding_optimizer.lr = lr
            self.embedding_optimizer.step()
            self.embedding_optimizer.zero_grad()
        return loss.data


def scalar_embedding_backward_seconds(weights, tokens, repeats=5):
    """The reference layer's share of a backward walk, timed on its own subgraph.

    The walk of a training step visits every node once; the embedding's nodes are
    the T x D sums and the table entries below them. A stub Value whose children are
    those sums (with local gradients standing in for the upstream ones) walks exactly them.
    """
    layer = reference.TokenPositionEmbedding(0, 0, N_EMBD)
    layer.token = reference.Embedding.from_rows(weights["wte"].tolist())
    layer.position = reference.Embedding.from_rows(weights["wpe"].tolist())
    times = []
    for _ in range(repeats):
        flat = [v for row in layer(tokens[:-1]) for v in row]
        stub = Value(0.0, flat, [0.001] * len(flat))
        with gc_paused():
            t0 = time.perf_counter()
            stub.backward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- the PyTorch model

def torch_model(weights, first_layer="fastembed", dtype=None):
    """The book's model in PyTorch; its first layer fastembed's (float32 always) or torch.nn.Embedding's."""
    import torch
    import torch.nn.functional as F

    import fastembed.torch as ft

    dtype = dtype or torch.float32

    class TorchTokenPosition(torch.nn.Module):
        """The same first layer on two torch.nn.Embedding: token(ids) + position(arange(T))."""

        def __init__(self):
            super().__init__()
            self.token = torch.nn.Embedding.from_pretrained(torch.tensor(weights["wte"], dtype=dtype), freeze=False)
            self.position = torch.nn.Embedding.from_pretrained(torch.tensor(weights["wpe"], dtype=dtype),
                                                               freeze=False)
            self.register_buffer("positions", torch.arange(BLOCK_SIZE))

        def forward(self, ids):
            return self.token(ids) + self.position(self.positions[: ids.shape[-1]])

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if first_layer == "fastembed":
                self.embedding = ft.TokenPositionEmbedding.from_pretrained(
                    torch.from_numpy(weights["wte"].copy()), torch.from_numpy(weights["wpe"].copy()), freeze=False)
            else:
                self.embedding = TorchTokenPosition()
            self.w = torch.nn.ParameterDict({
                name.replace(".", "_"): torch.nn.Parameter(torch.tensor(w, dtype=dtype))
                for name, w in weights.items() if name not in ("wte", "wpe")})
            self.register_buffer("future", torch.ones(BLOCK_SIZE, BLOCK_SIZE, dtype=torch.bool).triu(1))
            self.embedding_ns = 0  # forward of the first layer, summed over calls

        def forward(self, ids):
            """logits (T, vocab) for ids (T,)."""
            w, T = self.w, ids.shape[-1]
            t0 = time.perf_counter_ns()
            hidden = self.embedding(ids)
            self.embedding_ns += time.perf_counter_ns() - t0
            self.hidden = hidden
            x = rms(hidden.to(dtype))  # float32 -> float64 is exact, when the rest runs in float64
            for li in range(N_LAYER):
                residual = x
                x = rms(x)
                q, k, v = ((x @ w[f"layer{li}_{n}"].T).view(T, N_HEAD, HEAD_DIM).transpose(0, 1)
                           for n in ("wq", "wk", "wv"))
                scores = (q @ k.transpose(1, 2)) / HEAD_DIM**0.5
                scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
                attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, N_EMBD)
                x = attended @ w[f"layer{li}_wo"].T + residual
                residual = x
                x = F.relu(rms(x) @ w[f"layer{li}_fc1"].T) @ w[f"layer{li}_fc2"].T + residual
            return x @ w["lm_head"].T

        def loss(self, ids, targets):
            """Mean cross-entropy over the sentence."""
            return F.cross_entropy(self(ids), targets)

        def embedding_parameters(self):
            return list(self.embedding.parameters())

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)

    return GPT()


class TorchTrainer:
    """The book's training step for a PyTorch model, with the first layer's forward and backward timed in step.

    The backward of the first layer runs last: it starts when the gradient of its
    output is complete (a hook on that tensor) and ends when the last of its tables
    has its gradient (post-accumulate hooks on them).
    """

    def __init__(self, model, num_steps):
        import torch

        self.model, self.num_steps = model, num_steps
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=ADAM_EPS)
        self.backward_start = self.backward_end = 0
        self.embedding_backward_ns = 0
        for p in model.embedding_parameters():
            p.register_post_accumulate_grad_hook(self._table_done)

    def _grad_ready(self, grad):
        self.backward_start = time.perf_counter_ns()

    def _table_done(self, param):
        self.backward_end = time.perf_counter_ns()

    def step(self, ids, targets, step):
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.num_steps)
        loss = self.model.loss(ids, targets)
        self.model.hidden.register_hook(self._grad_ready)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.embedding_backward_ns += self.backward_end - self.backward_start
        self.optimizer.step()
        return loss.item()


def as_tensors(tokens):
    import torch

    ids = torch.tensor(tokens, dtype=torch.int64)
    return ids[:-1], ids[1:]


# ---------------------------------------------------------------- --check-reference

def check_reference(tokenizer, sentences, num_steps, seed):
    """Train each model num_steps steps from the same weights; True when every loss agrees with the reference."""
    import torch

    weights = init_weights(tokenizer.vocab_size, seed)
    data = [tokenizer.encode(s) for s in sentences[:num_steps]]
    runs = {}

    def scalar_run(first_layer):
        model = ScalarGPT(weights, first_layer)
        return [model.step(tokens, k, num_steps) for k, tokens in enumerate(data)]

    def torch_run(first_layer, dtype):
        trainer = TorchTrainer(torch_model(weights, first_layer, dtype), num_steps)
        return [trainer.step(*as_tensors(tokens), k) for k, tokens in enumerate(data)]

    runs["scalar reference (Value, float64)"] = scalar_run("reference")
    runs["scalar + fastembed bridge (to_values)"] = scalar_run("fastembed")
    runs["PyTorch float64, nn.Embedding float64"] = torch_run("torch", torch.float64)
    runs["PyTorch float64, fastembed float32"] = torch_run("fastembed", torch.float64)
    runs["PyTorch float32, fastembed float32"] = torch_run("fastembed", torch.float32)
    required = {"scalar + fastembed bridge (to_values)", "PyTorch float64, nn.Embedding float64",
                "PyTorch float64, fastembed float32"}

    expected = runs["scalar reference (Value, float64)"]
    print(f"--check-reference: {num_steps} training steps from the same float32-representable initial weights, "
          f"sentences: {', '.join(repr(s) for s in sentences[:num_steps])}")
    width = max(map(len, runs))
    print(f"{'model':<{width}}  " + "  ".join(f"{'loss step ' + str(k):>18}" for k in range(num_steps))
          + f"  {'max |diff|':>10}  required to agree to {TOLERANCE:g}")
    ok = True
    for name, losses in runs.items():
        diff = max(abs(a - b) for a, b in zip(losses, expected))
        verdict = "(the oracle)" if name == "scalar reference (Value, float64)" else (
            ("yes: ok" if diff <= TOLERANCE else "yes: FAILED") if name in required else "no (shown only)")
        ok &= diff <= TOLERANCE or name not in required
        print(f"{name:<{width}}  " + "  ".join(f"{x:18.15f}" for x in losses) + f"  {diff:10.2e}  {verdict}")
    print(
        "Where the differences come from: every model starts from the same float32 numbers. The scalar reference\n"
        "and the float64 PyTorch models compute in float64, except fastembed's layer, which is float32 by design:\n"
        "its tables, the sum tok + pos, the gradient it scatters and its Adam update are float32 (its output is\n"
        "widened exactly to float64). So 'nn.Embedding float64' shows the architecture matches the reference to\n"
        "float64 rounding, and the fastembed rows differ by the float32 roundings of the first layer alone\n"
        "(about 1e-7 relative), well inside the tolerance. The all-float32 row is shown, not required: Adam's\n"
        "first steps move each weight by about lr times the sign of its gradient, so a float32 rounding that flips\n"
        "the sign of a gradient element near zero could move a weight by 2 lr, a float32 effect, not a bug."
    )
    print("agreement: OK" if ok else "agreement: FAILED")
    return ok


# ---------------------------------------------------------------- timing, training, sampling

def time_scalar(weights, data, steps):
    """ms per step and ms per step in the first layer (forward + backward), for both scalar first layers."""
    rows = []
    for first_layer in ("reference", "fastembed"):
        model = ScalarGPT(weights, first_layer)
        step_s, layer_s = [], []
        for k in range(steps):
            tokens = data[k % len(data)]
            model.embedding_seconds = 0.0
            t0 = time.perf_counter()
            model.step(tokens, k, steps)
            step_s.append(time.perf_counter() - t0)
            layer_s.append(model.embedding_seconds)
            if first_layer == "reference":
                layer_s[-1] += scalar_embedding_backward_seconds(weights, tokens, repeats=3)
        rows.append((first_layer, 1e3 * statistics.median(step_s), 1e3 * statistics.median(layer_s)))
    return rows


def time_torch(weights, data, steps, rounds):
    """ms per step and ms per step in the first layer, for both PyTorch first layers, sampled round-robin."""
    trainers = {name: TorchTrainer(torch_model(weights, name), steps * rounds) for name in ("torch", "fastembed")}
    tensors = [as_tensors(tokens) for tokens in data]
    for trainer in trainers.values():  # warm up: first calls, allocator, Adam state
        for k in range(20):
            trainer.step(*tensors[k % len(tensors)], 0)
    samples = {name: ([], []) for name in trainers}
    position = 0
    for r in range(rounds):
        order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for name in order:
            trainer = trainers[name]
            trainer.model.embedding_ns = trainer.embedding_backward_ns = 0
            t0 = time.perf_counter_ns()
            for k in range(steps):
                trainer.step(*tensors[(position + k) % len(tensors)], r * steps + k)
            elapsed = time.perf_counter_ns() - t0
            samples[name][0].append(elapsed / steps / 1e6)
            samples[name][1].append((trainer.model.embedding_ns + trainer.embedding_backward_ns) / steps / 1e6)
        position += steps
    return [(name, statistics.median(s), statistics.median(e)) for name, (s, e) in samples.items()]


def train_and_sample(tokenizer, sentences, weights, num_steps, samples, seed):
    import torch

    model = torch_model(weights, "fastembed")
    trainer = TorchTrainer(model, num_steps)
    data = [as_tensors(tokenizer.encode(s)) for s in sentences]
    window, t0 = [], time.perf_counter()
    print(f"training {num_steps} steps (PyTorch with fastembed.torch, one sentence a step):")
    for step in range(num_steps):
        window.append(trainer.step(*data[step % len(data)], step))
        if (step + 1) % max(1, num_steps // 8) == 0 or step + 1 == num_steps:
            print(f"  step {step + 1:6d}  mean loss of the last {len(window):4d}: {statistics.fmean(window):.4f}")
            window = []
    print(f"  {time.perf_counter() - t0:.1f} s")
    generator = torch.Generator().manual_seed(seed)
    known = set(sentences)
    print(f"{samples} sampled sentences (temperature 0.5; * = not in the corpus):")
    with torch.no_grad():
        for _ in range(samples):
            tokens = [tokenizer.bos]
            while len(tokens) < BLOCK_SIZE:
                logits = model(torch.tensor(tokens, dtype=torch.int64))[-1]
                next_id = int(torch.multinomial((logits / 0.5).softmax(-1), 1, generator=generator))
                if next_id == tokenizer.bos:
                    break
                tokens.append(next_id)
            text = tokenizer.decode(tokens)
            print(f"  {'*' if text not in known else ' '} {text}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tiny_gpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-reference", action="store_true",
                        help="train the PyTorch and scalar models --steps steps from the same weights and exit "
                             "non-zero unless their losses agree to 1e-4 at every step")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 10000), or steps of the check (default 3)")
    parser.add_argument("--check-words", type=int, default=3,
                        help="the check uses sentences of at most this many words (the scalar model is slow)")
    parser.add_argument("--scalar-steps", type=int, default=3, help="steps timed of each scalar model")
    parser.add_argument("--torch-steps", type=int, default=50, help="steps per timing round of each PyTorch model")
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds (round-robin between the models)")
    parser.add_argument("--samples", type=int, default=8, help="sentences to sample after training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a one-sentence step has nothing to split, and threads "
                             "that spin on a shared machine only slow it down)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sentences = make_corpus(seed=args.seed)
    tokenizer = Tokenizer(sentences)
    try:
        import torch
    except ImportError:
        parser.error("this benchmark needs PyTorch: pip install torch")
    torch.set_num_threads(args.threads)
    if args.check_reference:
        steps = args.steps or 3
        short = [s for s in sentences if len(s.split()) <= args.check_words]
        if len(short) < steps:
            parser.error(f"only {len(short)} sentences have at most {args.check_words} words")
        return 0 if check_reference(tokenizer, short, steps, args.seed) else 1

    weights = init_weights(tokenizer.vocab_size, args.seed)
    num_params = sum(w.size for w in weights.values())
    lengths = [len(s.split()) for s in sentences]
    print(f"tiny GPT (the book's architecture): corpus of {len(sentences)} sentences, {min(lengths)} to "
          f"{max(lengths)} words (mean {statistics.fmean(lengths):.1f}); vocabulary {tokenizer.vocab_size} "
          f"({tokenizer.vocab_size - 1} words + BOS); {num_params:,} parameters")
    print(f"torch {torch.__version__} with {torch.get_num_threads()} threads; fastembed {fe.__version__} "
          f"with {fe.get_num_threads()} threads")
    data = [tokenizer.encode(s) for s in sentences]
    scalar = time_scalar(weights, data, args.scalar_steps)
    timed = time_torch(weights, data, args.torch_steps, args.rounds)
    names = {"reference": "scalar reference (Value), reference embedding",
             "fastembed": "scalar reference (Value), fastembed bridge",
             "torch": "PyTorch float32, nn.Embedding",
             "fastembed.torch": "PyTorch float32, fastembed.torch"}
    table = [(names[n], ms, emb) for n, ms, emb in scalar]
    table += [(names["torch" if n == "torch" else "fastembed.torch"], ms, emb) for n, ms, emb in timed]
    print("\nms per training step (one sentence: forward, backward, Adam), median; the first layer is its "
          "forward + backward:")
    print(f"| {'model':<47} | {'ms/step':>9} | {'first layer ms':>14} | {'share':>6} |")
    print(f"|{'-' * 49}|{'-' * 10}:|{'-' * 15}:|{'-' * 7}:|")
    for name, ms, emb in table:
        print(f"| {name:<47} | {ms:9.3f} | {emb:14.4f} | {100 * emb / ms:5.2f}% |")
    print(f"(scalar: median of {args.scalar_steps} steps; its reference embedding's backward is timed on its own "
          f"subgraph, the bridge's in step. PyTorch: median of {args.rounds} rounds of {args.torch_steps} steps, "
          "the first layer timed in step by hooks.)\n")
    train_and_sample(tokenizer, sentences, weights, args.steps or 10000, args.samples, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
