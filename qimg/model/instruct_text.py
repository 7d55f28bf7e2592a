"""Instruction encoding for the Qwen-Image-Edit family: the instruction and its pictures through Qwen2.5-VL,
exactly as the reference edit pipelines' `encode_prompt(prompt, image=...)` does it."""

# The edit pipelines' system prompt; its prefix through "user\n" is DROP tokens.
SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"  # the processor expands <|image_pad|> to the image's tokens
EDIT_TEMPLATE = SYSTEM + PICTURE + "{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen-Image-Edit: one inline picture
PLUS_TEMPLATE = SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"  # 2509/2511: "Picture N: " prefixes in the text
PLUS_PICTURE = "Picture {}: " + PICTURE
DROP = 64  # the reference's prompt_template_encode_start_idx: the system prefix, in Qwen2 tokens
