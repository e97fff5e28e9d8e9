"""Tokenizer built with Hugging Face `tokenizers` from a tokenizer.json or a GGUF vocabulary,
plus the model's chat template."""

from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lutlm.formats import TokenizerSpec

# GPT-2's split rule: contractions, letters, digits, other symbols, whitespace.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type): control and user-defined tokens are
# matched whole in text, never split by BPE.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _pre_tokenizer_for(pre: str | None):
    """The pre-tokenizer llama.cpp uses for a GGUF `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2_split = pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated")
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.Sequence([gpt2_split, byte_level])
    if pre == "smollm":  # digits one by one, then GPT-2's rule
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), gpt2_split, byte_level]
        )
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt2, smollm, llama-bpe)")


def _from_gguf_vocab(spec: TokenizerSpec) -> HFTokenizer:
    if spec.gguf_model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {spec.gguf_model!r}: lutlm builds byte-level BPE ('gpt2') tokenizers"
        )
    if not spec.tokens or not spec.merges:
        raise ValueError("the GGUF tokenizer has no tokens or no merges")
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer_for(spec.gguf_pre)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(spec.tokens[i], special=True, normalized=False)
        for i, kind in enumerate(spec.token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_special_tokens(special)
    return tok


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        if spec.tokenizer_json:
            self._tok = HFTokenizer.from_str(spec.tokenizer_json)
        else:
            self._tok = _from_gguf_vocab(spec)
        self.bos_id = spec.bos_token_id
        self.eos_id = spec.eos_token_id
        self.add_bos = spec.add_bos_token
        self.chat_template = spec.chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages ([{"role": ..., "content": ...}]) with the model's own template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use plain generation instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        token = lambda i: self.token_text(i) if i is not None else ""  # noqa: E731
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_id),
            eos_token=token(self.eos_id),
        )
