"""moe-generate: text from a trained model, streamed to the terminal.

    moe-generate [CHECKPOINT] --prompt "def main(" [--prompt ...] [--max-new-tokens 100]
                 [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--no-cache]

CHECKPOINT is a run directory, a checkpoint directory or a consolidated .safetensors file
(default: the newest run under runs/). Each prompt starts a new document: it is preceded by the
end-of-text token that separates documents in training. Temperature 0 is greedy decoding; the
same seed gives the same text. Generation stops at end-of-text or after --max-new-tokens.

Routing is causal (train/routing_modes.py): token choice without capacity (every token gets its
K experts), expert choice through its learned thresholds, so a token never depends on later
ones and the KV cache (train/kv_cache.py) gives exactly what recomputing the prefix would.
Past the model's context (model.seq_len) the context window slides: the newest half is kept
and re-encoded, so the cost per token stays bounded.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import torch

from train.commands import inference_device, quiet_deepspeed, run_command, seed
from train.config import ConfigError
from train.one_line_arguments import ArgumentParser, positive_int
from train.sampling import SamplingConfig, next_token


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    use_cache: bool = True,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The new tokens after `prompt` (which must not be empty). Routing is whatever the model is set
    to: call inside `routing(model, generation_mode(model))` for causal routing.

    The context is tokens[window_start:], at most model.cfg.seq_len tokens; when one more token
    would not fit, the window restarts at the newest seq_len // 2 tokens. With `use_cache` only the
    tokens not yet in the KV cache go through the model; without, the whole window does, at every
    step: the same logits, which the tests check token for token.
    """
    from train.kv_cache import KVCache

    if not prompt:
        raise ValueError("prompt must hold at least one token")
    context = model.cfg.seq_len
    keep = max(1, context // 2)
    device = model.embed.weight.device
    tokens = list(prompt)
    window_start = max(0, len(tokens) - context)
    cache = KVCache.for_model(model) if use_cache else None
    cached_upto = window_start  # tokens[window_start:cached_upto] are in the cache
    new: list[int] = []
    for _ in range(max_new_tokens):
        if len(tokens) - window_start > context:
            window_start = len(tokens) - keep
            if cache is not None:
                cache.reset()
                cached_upto = window_start
        if cache is None:
            logits = model(torch.tensor([tokens[window_start:]], device=device)).logits[:, -1]
        else:
            logits = model(torch.tensor([tokens[cached_upto:]], device=device), cache=cache).logits[:, -1]
            cached_upto = len(tokens)
        try:
            token = int(next_token(logits, sampling, generator)[0])
        except ValueError as error:  # not the user's input: the weights (a diverged run?) give no number to sample from
            raise ConfigError(f"generating token {len(new) + 1}: {error} (the checkpoint's weights give NaN or inf)") from None
        tokens.append(token)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_tokens:
            break
    return new


class TextStream:
    """Prints decoded text as tokens arrive. A byte-level BPE token can end inside a multi-byte
    character, so text is printed only up to the last complete character; `finish` prints the rest."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer = tokenizer
        # Looked up now, not at import: a redirected or captured stdout must receive the text.
        self.out = out if out is not None else sys.stdout
        # The ids since the last complete character. Only these are decoded, so a token costs a
        # decode of a few ids rather than of everything so far (quadratic in the length). Decoding
        # them apart gives the same text as decoding all ids: the byte-level decoder maps each token
        # to its bytes and decodes their concatenation as UTF-8 (no prefix-space rule), and UTF-8
        # decoding does not look back across a complete character.
        self.pending: list[int] = []

    def __call__(self, token: int) -> None:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # a character still incomplete: wait for its next bytes
            return
        self._write(text)

    def finish(self) -> None:
        """Print what is still pending: generation may stop inside a character, whose bytes then
        print as the replacement character rather than not at all."""
        self._write(self.tokenizer.decode(self.pending) if self.pending else "")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.pending.clear()


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="moe-generate", description="Generate text from a trained MoE GPT (streams to stdout).")
    parser.add_argument("checkpoint", nargs="?", help="run directory, checkpoint directory or consolidated .safetensors "
                        "(default: the newest run under runs/)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: one empty prompt")
    parser.add_argument("--max-new-tokens", type=positive_int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus: the most likely tokens up to mass p, in (0, 1]")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed: the same seed gives the same text")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context at every token (slow)")
    parser.add_argument("--device", type=inference_device, default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args(argv)
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as error:
        parser.error(str(error))
    quiet_deepspeed()
    from train.load import load_model
    from train.routing_modes import generation_mode, routing

    loaded = load_model(args.checkpoint, args.device)
    tokenizer, eot = loaded.tokenizer()
    # The output layer has rows past the tokenizer's vocabulary (padding); they must never be sampled.
    sampling = dataclasses.replace(sampling, vocab_size=tokenizer.get_vocab_size())
    mode = generation_mode(loaded.model)
    print(f"model       {loaded.source} (step {loaded.step}), routing: {mode.name}, "
          f"{'greedy' if sampling.greedy else f'temperature {sampling.temperature}'}"
          f"{f', top-k {sampling.top_k}' if sampling.top_k else ''}{f', top-p {sampling.top_p}' if sampling.top_p else ''}"
          f", seed {args.seed}", file=sys.stderr, flush=True)
    for prompt in args.prompt or [""]:
        generator = torch.Generator().manual_seed(args.seed)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        stream = TextStream(tokenizer)
        started = time.perf_counter()
        prompt_ids = [eot, *tokenizer.encode(prompt).ids]
        if len(prompt_ids) > loaded.run.model.seq_len:
            print(f"note: the prompt is {len(prompt_ids)} tokens, the context {loaded.run.model.seq_len}: only its "
                  f"last {loaded.run.model.seq_len} are seen", file=sys.stderr, flush=True)
        with routing(loaded.model, mode):
            new = generate_tokens(loaded.model, prompt_ids, args.max_new_tokens, sampling,
                                  generator, use_cache=not args.no_cache, stop_tokens=(eot,), on_token=stream)
        stream.finish()
        elapsed = time.perf_counter() - started
        sys.stdout.write("\n")
        print(f"[{len(new)} tokens, {len(new) / elapsed:.1f} tokens/s]", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(_main, argv))


if __name__ == "__main__":
    main()
