"""Hugging Face transformers integration: read a CausalLM's lm_head, get its hidden states, fuse the loss.

    from opd_kernels import hf
    head = hf.lm_head(model)                      # LMHead(weight, bias, softcap, scale)
    h = hf.hidden_states(model, input_ids, mask)  # (B, T, H), no logits
    loss = hf.distillation_loss(student, teacher, input_ids, attention_mask=mask, loss_mask=completion)
"""
from .heads import LMHead, head_logits, lm_head, verify_lm_head
from .loss import (ScoredPair, check_same_tokenizer, distillation_loss, next_token_mask, no_autocast, score_pair,
                   verified_lm_head)
from .states import POSITIONS, decoder_stack, hidden_states, position_ids_from_mask, unwrap_model

__all__ = [
    "LMHead", "lm_head", "head_logits", "verify_lm_head", "hidden_states", "position_ids_from_mask",
    "distillation_loss", "next_token_mask", "check_same_tokenizer", "score_pair", "ScoredPair", "no_autocast",
    "verified_lm_head", "unwrap_model", "decoder_stack", "POSITIONS",
]
