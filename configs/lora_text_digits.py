"""DreamBooth-style LoRA fine-tuning of the text-conditioned digits model (configs/text_digits.py) on a new
concept: "<v1>", thick sevens slanted to the left, learned from 8 examples (captioned_digits/16 filtered to
label 7, thickness bin 2, slant bin 0) with the instance prompt "a <v1> seven". "<v1>" is a new token: a new
word of the tokenizer and a new trained row of the text encoder's token table (started at random); rank-4
adapters on every attention layer of the UNet. Prior preservation: 100 samples of "a regular seven" drawn by the
frozen base at the start (kept in <workdir>/class_images), loss = instance loss + 1.0 * prior loss.

    python train.py --config configs/text_digits.py --workdir runs/text_digits
    python train.py --config configs/lora_text_digits.py --workdir runs/lora_text_digits \\
        --config.lora.base=runs/text_digits
    python sample.py --workdir runs/lora_text_digits --prompt "a <v1> seven" --num 20 --guidance_scale 3
    python benchmarks/lora_text_digits.py --runs runs/lora_text_digits ...     # what docs/lora.md reports

Trains 16,192 parameters (rank-4 adapters: 16,128; one 64-wide token row) beside the frozen 510,609-parameter base.
Runtime measured on the shared 2-core CPU machine (load 5-9, 2026-11-30): about 1 min per run (class images
10-25 s, step compilation 8-28 s, then 4-20 steps/s). The measured effect (the concept learned, prior preservation
against language drift): docs/lora.md and benchmarks/results/lora_text_digits.md.
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.task = "lora"
    c.lora.base = "runs/text_digits"
    c.lora.targets = ("attention",)
    c.lora.rank = 4
    c.lora.instance_prompt = "a <v1> seven"
    c.lora.new_tokens = ("<v1>",)
    c.lora.instance_filter = ("label=7", "thickness=2", "slant=0")
    c.lora.num_instance_images = 8
    c.lora.class_prompt = "a regular seven"
    c.lora.num_class_images = 100
    c.lora.prior_loss_weight = 1.0
    c.data.name = "captioned_digits/16"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.random_flip = False       # a flip would turn a left slant into a right one
    c.data.label_key = None
    c.process.name = "vp_cosine"     # the base's
    c.loss.target = "v"
    c.text.caption_dropout = 0.1     # keeps the empty caption (guidance) in training
    c.train.steps = 300
    c.train.batch_size = 16          # 16 instance + 16 class images per step
    c.train.ema_decay = 0.99
    c.train.log_every = 50
    c.train.sample_every = 0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 20
    c.checkpoint.every = 100
    c.sample.guidance_scale = 3.0    # the class images and sample grids: guided as the base samples best
    c.sample.num = 20
    return c
