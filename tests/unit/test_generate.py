"""KV-cache generation against recomputing the whole context, causal routing at generation, streamed text, CLI errors."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig
from train.config import ConfigError
from train.data import train_bpe_tokenizer
from train.data.tokenizer import eot_id
from train.generate import TextStream, generate_tokens
from train.kv_cache import KVCache
from train.model import GPT, ModelConfig
from train.routing_modes import generation_mode, moe_layers, routing
from train.sampling import SamplingConfig

VOCAB, SEQ = 64, 16


def _model(**moe_overrides) -> GPT:
    torch.manual_seed(0)
    # A capacity factor small enough to drop tokens: generation must switch it off.
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "capacity_factor": 0.5, "eval_capacity_factor": 0.5,
                       "min_capacity": 0, **moe_overrides})
    model = GPT(ModelConfig(seq_len=SEQ, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden=48), moe, VOCAB, seed=0)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 1.0)  # decisive routing: no near-ties between experts
        model.embed.weight.normal_(0, 1.0)  # a peaked next-token distribution, so greedy has no near-ties
    if model.moe_config.router == "expert_choice":
        for layer in moe_layers(model):
            # Thresholds as training would learn them: a token gets 0 to 4 experts.
            layer.router.threshold.copy_(torch.tensor([0.2, 0.25, 0.3, 0.22]))
            layer.router.threshold_ready.fill_(1.0)
    return model.eval()


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_cached_logits_equal_full_forward(router):
    model = _model(router=router)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad(), routing(model, generation_mode(model)):
        full = model(tokens).logits
        cache = KVCache.for_model(model, batch=2)
        pieces = [model(tokens[:, :5], cache=cache).logits]  # a prefill of several tokens
        pieces += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(5, 9)]  # one at a time
        pieces.append(model(tokens[:, 9:], cache=cache).logits)  # several after a cached prefix (offset mask)
    assert cache.length == SEQ
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)])
def test_cache_generation_equals_no_cache_token_for_token(router, sampling):
    model = _model(router=router)
    prompt = [3, 14, 15, 9, 2, 6]
    runs = []
    for use_cache in (True, False):
        with routing(model, generation_mode(model)):
            # 3 * SEQ new tokens: the context window slides twice.
            runs.append(generate_tokens(model, prompt, 3 * SEQ, sampling, torch.Generator().manual_seed(7),
                                        use_cache=use_cache))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3 * SEQ


def test_cache_feeds_each_token_once():
    """With the cache, n new tokens cost n - 1 one-token forwards after the prompt (linear);
    without it every step re-reads the whole context (quadratic)."""
    model = _model()
    positions = {True: 0, False: 0}
    for use_cache in (True, False):
        def count(module, args, out, use_cache=use_cache):
            positions[use_cache] += args[0].shape[1]

        handle = model.embed.register_forward_hook(count)
        with routing(model, generation_mode(model)):
            generate_tokens(model, [1, 2, 3], 10, SamplingConfig(temperature=0), use_cache=use_cache)
        handle.remove()
    assert positions[True] == 3 + 10 - 1
    assert positions[False] == sum(range(3, 3 + 10))


def test_generation_routing_is_dropless_and_restored():
    model = _model()
    assert generation_mode(model).name == "dropless"
    with routing(model, generation_mode(model)):
        assert model.moe_config.eval_capacity_factor is None
    assert model.moe_config.eval_capacity_factor == 0.5


def test_expert_choice_without_thresholds_cannot_generate():
    model = _model(router="expert_choice")
    for layer in moe_layers(model):
        layer.router.threshold_ready.zero_()
    with pytest.raises(ConfigError, match="thresholds"):
        generation_mode(model)


def test_cache_respects_the_context_length():
    model = _model()
    cache = KVCache.for_model(model)
    with torch.no_grad():
        model(torch.zeros(1, SEQ - 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="seq_len"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# Accents, CJK and emoji: 2-, 3- and 4-byte characters, which a small byte-level vocabulary splits
# across tokens, with leading and repeated spaces (where a prefix-space rule would show).
MULTILINGUAL = [
    "Café crème brûlée à Zürich, naïve façade. 🦦 the otter swims 🦦🦦 near the river.",
    "日本語のテキスト and 😀 emoji 🎉🎉 with  double  spaces\n and a new line.",
    " Ünïcödé everywhere: ñ, ø, ß, 東京, 🐍 python 🐍.",
]


class _Out:
    """A stream that records each write."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def write(self, text: str) -> None:
        self.pieces.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(MULTILINGUAL * 4, 300)


def _stream_ids(tokenizer) -> list[int]:
    eot = eot_id(tokenizer)
    ids = [eot, *tokenizer.encode(" Dès 🦦 here: 日本 😀🎉 ñø").ids, eot, *tokenizer.encode("🐍 façade  🦦").ids]
    # The test is only worth its name if characters really are split across tokens.
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    return ids


def test_text_stream_prints_exactly_the_decoded_text_at_every_stopping_point(tokenizer):
    ids = _stream_ids(tokenizer)
    for stop in range(len(ids) + 1):  # generation may end after any token, inside a character too
        out = _Out()
        stream = TextStream(tokenizer, out)
        for token in ids[:stop]:
            stream(token)
        # Before finish only complete characters are printed; after it, everything.
        assert "\ufffd" not in "".join(out.pieces)
        stream.finish()
        assert "".join(out.pieces) == tokenizer.decode(ids[:stop])


def test_text_stream_on_arbitrary_tokens_equals_decoding_them_all(tokenizer):
    """Any token sequence, invalid UTF-8 included (lone continuation bytes, truncated characters):
    printing the pending ids apart concatenates to the decode of the whole."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (40,), generator=generator).tolist()
        out = _Out()
        stream = TextStream(tokenizer, out)
        for token in ids:
            stream(token)
        stream.finish()
        assert "".join(out.pieces) == tokenizer.decode(ids)


def test_text_stream_decodes_only_the_pending_ids(tokenizer):
    """Each token decodes the ids since the last complete character, not the whole text (quadratic)."""
    decoded: list[int] = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tokenizer.decode(ids)

    ids = _stream_ids(tokenizer) * 20
    stream = TextStream(Counting(), _Out())
    for token in ids:
        stream(token)
    stream.finish()
    # A 4-byte character spans at most 4 tokens.
    assert max(decoded) <= 4
    assert sum(decoded) <= 4 * len(ids)


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
# Mistakes both inference commands can meet, then the sampling options only moe-generate has.
_EITHER_COMMAND = [pytest.param(["/nonexistent/run"], "no such checkpoint"),
                   pytest.param(["x", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
                   pytest.param(["x", "--device", "mps"], "expected cpu, cuda or cuda:N"),
                   pytest.param(["x", "--device", "cuda"], "no CUDA device is available", marks=_NO_CUDA)]
_GENERATE_ONLY = [pytest.param(["x", "--top-p", "1.5"], "top_p must be in"),
                  pytest.param(["x", "--top-k", "0"], "positive integer"),
                  pytest.param(["x", "--temperature", "-1"], "temperature must be"),
                  # inf made every logit NaN (padded rows are -inf, and -inf / inf is NaN): a traceback
                  pytest.param(["x", "--temperature", "inf"], "temperature must be a finite number"),
                  pytest.param(["x", "--seed", "100000000000000000000000"], "--seed: expected an integer from 0"),
                  pytest.param(["x", "--seed", "-1"], "--seed: expected an integer from 0")]
_EVALUATE_ONLY = [pytest.param(["x", "--capacity-factor", "inf"], "--capacity-factor: expected a finite number > 0"),
                  pytest.param(["x", "--text", "t.txt", "--windows", "3"], "--text evaluates the whole file"),
                  pytest.param(["x", "--text", "t.txt", "--all-windows"], "--text evaluates the whole file")]


def _cases(command, cases):
    return [pytest.param(command, *case.values, marks=case.marks) for case in cases]


@pytest.mark.parametrize(
    "command, argv, message",
    _cases("train.generate", _EITHER_COMMAND + _GENERATE_ONLY) + _cases("train.evaluate", _EITHER_COMMAND + _EVALUATE_ONLY),
)
def test_cli_bad_input_is_one_line_and_exit_2(command, argv, message, capsys):
    import importlib

    main = importlib.import_module(command).main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_a_closed_output_pipe_ends_a_command_quietly(tmp_path):
    """`moe-generate ... | head`: the reader goes away; the command stops with 128 + SIGPIPE and no traceback."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import sys\nfrom train.commands import run_command\n"
            "def body(argv):\n    while True:\n        print('token ' * 1000, flush=True)\n"
            "sys.exit(run_command(body, []))\n")
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=subprocess_env(), cwd=tmp_path)
    reader.stdout.read(100)
    reader.stdout.close()
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
