"""The reasoning models' entries: they compose, and their chat-template variables (Qwen3's thinking
switch) reach the template the runner applies. No downloads: a local tokenizer renders the template."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from kvbench.config import load_config
from kvbench.runner import encode
from kvbench.tasks import Sample

# the generation-prompt end of Qwen3's template: thinking off writes an empty think block
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


class CharTemplateTokenizer:
    """transformers' own chat-template rendering (a local tokenizer, no vocabulary needed for text),
    one id per character for the rendered prompt."""

    def __init__(self, template: str):
        self.hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                          unk_token="[UNK]")
        self.hf.chat_template = self.chat_template = template

    def apply_chat_template(self, *args, **kwargs):
        return self.hf.apply_chat_template(*args, **kwargs)

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


def prompt_text(model_cfg) -> str:
    sample = Sample(id="s", context="What is 1 + 1?", question="", answers=["2"], max_new_tokens=8, chat_template=True)
    ctx, q = encode(sample, CharTemplateTokenizer(QWEN3_LIKE), model_cfg, "whole")
    assert q is None
    return "".join(map(chr, ctx[0].tolist()))


@pytest.mark.parametrize("name,path,kwargs", [
    ("deepseek-r1-distill-qwen-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", {}),
    ("qwen3-8b", "Qwen/Qwen3-8B", {"enable_thinking": True}),
    ("qwen3-8b-nothink", "Qwen/Qwen3-8B", {"enable_thinking": False}),
])
def test_reasoning_model_entries_compose(compose, name, path, kwargs):
    cfg = compose([f"model={name}", "task=aime25", "task.max_new_tokens=32768", "decoding.temperature=0.6",
                   "decoding.top_p=0.95", "decoding.n=4"])
    assert (cfg["model"]["name"], cfg["model"]["path"], cfg["model"]["source"]) == (name, path, "hub")
    assert cfg["model"]["chat_template_kwargs"] == kwargs and cfg["task"]["max_new_tokens"] == 32768
    typed = load_config(cfg)
    typed.model.validate()
    assert typed.decoding.n == 4 and typed.model.chat_template_kwargs == kwargs


def test_the_thinking_switch_reaches_the_chat_template(compose):
    thinking = prompt_text(load_config(compose(["model=qwen3-8b"])).model)
    plain = prompt_text(load_config(compose(["model=qwen3-8b-nothink"])).model)
    assert thinking == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    assert plain == thinking + "<think>\n\n</think>\n\n"
    # a variable set on the command line reaches it too
    switched = compose(["model=qwen3-8b", "model.chat_template_kwargs.enable_thinking=false"])
    assert prompt_text(load_config(switched).model) == plain
