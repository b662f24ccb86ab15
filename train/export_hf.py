"""moe-export: a token-choice model as a Hugging Face Mixtral checkpoint.

    moe-export [CHECKPOINT] --out DIR

Writes DIR/config.json, DIR/model.safetensors (fp32) and the tokenizer (tokenizer.json +
tokenizer_config.json, and generation_config.json, which stops at end-of-text and suppresses the
padded vocabulary ids; without the tokenizer, the ids from the run's data.vocab_size up), which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load
offline. Weights use the Hub's Mixtral names
(`block_sparse_moe.experts.{e}.w1/w2/w3`), which transformers 4.x loads as they are and 5.x
converts on load into its fused expert tensors.

The mapping is exact:
- our fused `qkv` is split into q_proj, k_proj, v_proj (one key/value head per query head);
- our rotary embedding rotates interleaved channel pairs (2i, 2i+1) by angle i (train/model.py
  `apply_rotary`), Mixtral rotates (i, i + d/2) (`rotate_half`): permuting the rows of q_proj and
  k_proj within each head, evens first then odds, turns one into the other, and attention scores
  are unchanged because q and k are permuted alike;
- the router: Mixtral takes the softmax of all logits, the top-k, and renormalises the k
  weights, as our token-choice router with score_func=softmax, normalize_topk=true and k >= 2;
- the vocabulary keeps our padded rows (train.model.padded_vocab_size), so logits match
  position for position; tied embeddings map to tie_word_embeddings.
Mixtral routes without capacity: it equals our model in the `dropless` routing mode.

What Mixtral cannot express is refused with one line naming it: expert choice, a shared
expert, sigmoid scores, unnormalised top-k weights, top-1 (our weight is the router
probability; Mixtral's renormalised weight is 1), a selection bias (aux-loss-free balancing),
dense FFN blocks between MoE blocks (moe.every > 1), a dense model, stock DeepSpeed layers.

The checkpoint is written into a sibling `DIR.partial` and renamed into place once complete, so a
crash or kill never leaves a half-written DIR that looks loadable (a later export removes the
leftover; a folder of other files under that name is refused, not deleted). An existing DIR is
replaced as a whole, as the export's own files always were: it is renamed away (to `DIR.replaced`),
the new one renamed in, and only then is the old one removed. A DIR that cannot be
renamed (a mount point, or a parent this user may not write) keeps its place: the files are written
into DIR/.moe-export.partial and renamed one by one, config.json last. A DIR holding files the export
does not write is refused with one line naming them, rather than deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from train.commands import quiet_deepspeed, run_command
from train.config import ConfigError
from train.durable import fsync_path, save_safetensors
from train.one_line_arguments import ArgumentParser
from train.output_path import output_problem
from train.routing_modes import moe_layers

# Every file an export may write: an existing --out holding only these is a previous export.
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"})
STAGING_DIR = ".moe-export.partial"
"""Inside an output directory that must stay in place (see `_must_stay_in_place`): where files are written first."""


def unsupported_features(model: torch.nn.Module) -> list[str]:
    """What `model` has that a Mixtral checkpoint cannot represent exactly (empty: exportable)."""
    moe = model.moe_config
    if moe.every == 0:
        return ["a dense model (moe.every=0): Mixtral needs an MoE FFN in every block"]
    problems = []
    if moe.implementation != "ours":
        problems.append(f"stock DeepSpeed MoE layers (moe.implementation={moe.implementation}): their gate is DeepSpeed's own")
    if moe.router != "token_choice":
        problems.append(f"{moe.router.replace('_', ' ')} routing (moe.router={moe.router}): Mixtral is token choice")
    if moe.every != 1:
        problems.append(f"dense FFN blocks between MoE blocks (moe.every={moe.every}): every Mixtral block is MoE")
    if moe.shared_expert_hidden:
        problems.append("a shared expert (moe.shared_expert_hidden): Mixtral has none")
    if moe.score_func != "softmax":
        problems.append(f"{moe.score_func} router scores (moe.score_func={moe.score_func}): Mixtral takes a softmax")
    if moe.router == "token_choice" and not moe.normalize_topk and moe.top_k > 1:
        problems.append("unnormalised top-k weights (moe.normalize_topk=false): Mixtral renormalises them to sum to 1")
    if moe.router == "token_choice" and moe.top_k == 1:
        problems.append("top-1 routing (moe.top_k=1): our weight is the router probability, Mixtral's renormalised weight is 1")
    biases = [b for name, b in model.named_buffers() if name.endswith("selection_bias")]
    if moe.bias_update_rate > 0 or any(bool(b.abs().sum() > 0) for b in biases):
        problems.append("a selection bias (aux-loss-free balancing, moe.bias_update_rate): Mixtral selects by score alone")
    return problems


def rotary_rows_to_halves(weight_OD: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered within each head from interleaved pairs (2i, 2i+1) to
    halves (i, i + d/2): evens first, then odds."""
    head_dim = weight_OD.shape[0] // heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight_OD.view(heads, head_dim, -1)[:, order].reshape_as(weight_OD)


def mixtral_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT's weights under Mixtral's (Hub) names."""
    cfg = model.cfg
    dim, heads = cfg.hidden_size, cfg.num_heads
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        q, k, v = block.attn.qkv.weight.split(dim, dim=0)
        state[f"{prefix}.self_attn.q_proj.weight"] = rotary_rows_to_halves(q, heads)
        state[f"{prefix}.self_attn.k_proj.weight"] = rotary_rows_to_halves(k, heads)
        state[f"{prefix}.self_attn.v_proj.weight"] = v
        state[f"{prefix}.self_attn.o_proj.weight"] = block.attn.proj.weight
        state[f"{prefix}.input_layernorm.weight"] = block.attn_norm.weight
        state[f"{prefix}.post_attention_layernorm.weight"] = block.ffn_norm.weight
        state[f"{prefix}.block_sparse_moe.gate.weight"] = block.ffn.router.weight
        for e, expert in enumerate(block.ffn.local_experts):
            for name in ("w1", "w2", "w3"):
                state[f"{prefix}.block_sparse_moe.experts.{e}.{name}.weight"] = getattr(expert, name).weight
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def mixtral_config(model: torch.nn.Module, eot_id: int | None) -> dict:
    cfg, moe = model.cfg, model.moe_config
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": int(model.embed.weight.shape[0]),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": moe.expert_hidden or cfg.ffn_hidden,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": mixtral_aux_loss_coef(moe.aux_loss_coef, len(moe_layers(model)), moe.top_k),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }


def mixtral_aux_loss_coef(coef: float, num_moe_layers: int, top_k: int) -> float:
    """Our moe.aux_loss_coef as the weight that gives a fine-tuning run in transformers the same
    balancing pressure. We add coef x L per MoE layer, L = E sum_e f_e P_e with f the share of the
    T*K assignments (1 when balanced), so coef x layers in all. Mixtral's loss is computed once over
    the tokens of all layers pooled, with f the share of the T tokens that chose e (K when balanced):
    about K x the mean of our per-layer L. The same total needs coef x layers / K. (Pooled, the two
    are not equal off balance: a product of pooled means, not a mean of per-layer products.)"""
    return coef * num_moe_layers / top_k


def export_mixtral(model: torch.nn.Module, out: Path, tokenizer_file: Path | None = None,
                   vocab_size: int | None = None) -> None:
    """Write a Mixtral checkpoint of `model` (a train.model.GPT) to directory `out`, replacing a
    previous export there; ConfigError when the model has something Mixtral cannot represent or
    `out` holds something else. Without `tokenizer_file`, `vocab_size` (the run's data.vocab_size,
    which bounds its tokenizer's) still lets generation_config.json keep the padded rows out."""
    # Checked here rather than in the command, so API callers are refused too, before any file is written.
    problems = unsupported_features(model)
    if problems:
        raise ConfigError(f"cannot export to Mixtral: {'; '.join(problems)}")
    out = Path(os.path.abspath(out))  # a name to put siblings beside, even for "."
    if out.is_symlink():
        out = out.resolve()  # replace what the link names, as writing through it did
    _check_replaceable(out)
    eot_id = None
    tokenizer = None
    if tokenizer_file is not None:
        from train.load import read_tokenizer

        tokenizer, eot_id = read_tokenizer(tokenizer_file, model)
    whole_directory = not _must_stay_in_place(out)
    partial = out.with_name(out.name + ".partial") if whole_directory else out / STAGING_DIR
    _remove_leftover(partial)  # left by an export that was killed
    if whole_directory:  # (refused now, not after the weights are written)
        _remove_leftover(out.with_name(out.name + ".replaced"))
    partial.mkdir(parents=True)
    try:
        _write_checkpoint(model, partial, eot_id, tokenizer, vocab_size)
        for path in partial.iterdir():
            fsync_path(path)
        fsync_path(partial)
        if whole_directory:
            _move_into_place(partial, out)
        else:
            _replace_files_in_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _must_stay_in_place(out: Path) -> bool:
    """An existing `out` that cannot be renamed away: a mount point (a container's volume, `--out /out`),
    or a directory whose parent this user may not write."""
    return out.is_dir() and (os.path.ismount(out) or not os.access(out.parent, os.W_OK))


def _replace_files_in_place(partial: Path, out: Path) -> None:
    """The fallback when `out` itself must stay: each file renamed into it on its own (atomic per
    file), config.json last, since transformers takes a directory with a config for a model; then
    files of an earlier export that this one did not write (a tokenizer) are removed."""
    written = sorted(path.name for path in partial.iterdir())
    for name in sorted(written, key=lambda name: name == "config.json"):
        os.replace(partial / name, out / name)
    for name in EXPORT_FILES - set(written):
        (out / name).unlink(missing_ok=True)
    partial.rmdir()
    fsync_path(out)


def _check_replaceable(out: Path) -> None:
    """ConfigError unless `out` is absent or a directory holding only a previous export's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    foreign = _foreign_entries(out, also_allowed=STAGING_DIR)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(f"{out}: holds files moe-export does not write ({shown}); "
                          "remove them or choose another directory")


def _foreign_entries(directory: Path, also_allowed: str | None = None) -> list[str]:
    """The names in `directory` that are not files an export writes (nor `also_allowed`), sorted."""
    return sorted(path.name for path in directory.iterdir() if path.name != also_allowed
                  and (path.name not in EXPORT_FILES or not path.is_file()))


def _remove_leftover(path: Path) -> None:
    """Remove what a killed export left at `path`, a name beside or inside --out that the export
    uses; ConfigError when something else is there (a folder of the user's that happens to bear the
    name), rather than delete it."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or _foreign_entries(path) or any(e.is_symlink() for e in path.iterdir()):
        raise ConfigError(f"{path}: in the way of the export, and not what an earlier export left there "
                          "(it holds other files); move it away or choose another --out")
    shutil.rmtree(path)


def _write_checkpoint(model: torch.nn.Module, out: Path, eot_id: int | None, tokenizer, vocab_size: int | None) -> None:
    """The checkpoint's files, in the (empty) directory `out`."""

    from train.data import EOT

    save_safetensors(mixtral_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(mixtral_config(model, eot_id), indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        if eot_id is not None:
            from tokenizers import processors

            # Every training document follows an end-of-text token, and moe-generate starts each prompt
            # with one: the HF tokenizer prepends it as the BOS token (add_special_tokens=False leaves it out).
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot_id)])
        tokenizer.save(str(out / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT, "eos_token": EOT, "unk_token": None,
            "model_max_length": model.cfg.seq_len,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        vocab_size = tokenizer.get_vocab_size()
    if vocab_size is not None:
        (out / "generation_config.json").write_text(
            json.dumps(generation_config(model, eot_id, vocab_size), indent=2) + "\n", encoding="utf-8")


def generation_config(model: torch.nn.Module, eot_id: int | None, tokenizer_vocab: int) -> dict:
    """transformers' generation defaults for the export: stop at end-of-text (when the tokenizer
    names it), and never produce the padded vocabulary rows (ids the tokenizer cannot decode), as
    moe-generate never does."""
    stops = {"bos_token_id": eot_id, "eos_token_id": eot_id} if eot_id is not None else {}
    return {**stops, "suppress_tokens": list(range(tokenizer_vocab, int(model.embed.weight.shape[0])))}


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename the complete `partial` to `out`; a previous `out` is renamed away first and removed
    only once the new one is in place, so `out` is always either the old export or the new one."""
    old = out.with_name(out.name + ".replaced")  # (a leftover there was removed before the export began)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the previous export back under its name
        raise
    fsync_path(out.parent)  # the renames are durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)




def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="moe-export", description="Export a token-choice model as a Hugging Face Mixtral checkpoint.")
    parser.add_argument("checkpoint", nargs="?", help="run directory, checkpoint directory or consolidated .safetensors "
                        "(default: the newest run under runs/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    if problem := output_problem(args.out, "--out", folder=True):
        parser.error(problem)  # before the model is loaded
    quiet_deepspeed()
    from train.load import load_model

    loaded = load_model(args.checkpoint)
    note = None
    try:
        tokenizer_file = loaded.tokenizer_path()
    except ConfigError as error:
        note, tokenizer_file = f"note: no tokenizer exported ({error})", None
    export_mixtral(loaded.model, args.out, tokenizer_file, vocab_size=loaded.run.data.vocab_size)
    if note is not None:  # after the export, so a refused model's error stays the only line
        print(note, file=sys.stderr)
    print(f"exported {loaded.source} (step {loaded.step}) as Mixtral -> {args.out} "
          f"(equals our model with dropless routing; load with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(_main, argv))


if __name__ == "__main__":
    main()
