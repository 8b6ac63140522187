"""Mixtral GGUF files: llama.cpp writes Mixtral (and other Llama-shaped MoE models) as architecture
"llama" with `llama.expert_count` experts, whose weights are 3-D blk.N.ffn_gate_exps / ffn_up_exps /
ffn_down_exps tensors. transformers' GGUF reader builds a dense LlamaForCausalLM from such a file
(it reads no expert count) and cannot load it; lowbit builds transformers' MixtralForCausalLM
instead. gguf_import gives the config the experts from the metadata (`_UNREAD_FIELDS`; llama.cpp's
feed_forward_length of a Mixtral file is one expert's width, Mixtral's intermediate_size); the
tensor processor here undoes Llama's q / k interleaving as transformers' Llama one does and merges
the experts into gate_up_proj (gate rows first, as transformers' Mixtral conversion merges w1 and
w3) and down_proj as its Qwen2-MoE one does, so gguf_import places them like any other MoE file's."""
from __future__ import annotations

import re


def processor_class() -> type:
    """transformers' Llama tensor processor, whose 3-D expert tensors are merged as its Qwen2-MoE
    processor merges them."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, Qwen2MoeTensorProcessor

    class MixtralTensorProcessor(Qwen2MoeTensorProcessor):
        def process(self, weights, name: str, **kwargs):
            if re.fullmatch(self.GGUF_MOE_WEIGHTS_PATTERN, name):
                return super().process(weights, name, **kwargs)
            return LlamaTensorProcessor.process(self, weights, name, **kwargs)

        _reverse_permute_weights = LlamaTensorProcessor._reverse_permute_weights

    return MixtralTensorProcessor
