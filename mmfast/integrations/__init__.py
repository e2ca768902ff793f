"""Drop-ins for other libraries' models, each in its own module so that importing one never needs the others.

  mmfast.integrations.peft   patch_peft_model / unpatch_peft_model: PEFT LoRA Linear layers on the fused op
  mmfast.integrations.transformers   register_attention: attn_implementation="mmfast" on cross_modal_attention
"""
