"""Parameter shapes of two real models, written out so the bench needs neither transformers nor
torchvision: GPT-2 medium (292 tensors, 354.8M parameters, lm_head tied to wte) and ResNet-50
(161 tensors, 25.6M parameters), in each library's parameter order."""

import math


def gpt2_medium_shapes(n_layer=24, d=1024, vocab=50257, n_ctx=1024):
    shapes = [(vocab, d), (n_ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [(d,), (d,),                      # ln_1 weight, bias
                   (d, 3 * d), (3 * d,),            # attn.c_attn (Conv1D: in × out)
                   (d, d), (d,),                    # attn.c_proj
                   (d,), (d,),                      # ln_2
                   (d, 4 * d), (4 * d,),            # mlp.c_fc
                   (4 * d, d), (d,)]                # mlp.c_proj
    return shapes + [(d,), (d,)]                    # ln_f


def resnet50_shapes(num_classes=1000):
    shapes = [(64, 3, 7, 7), (64,), (64,)]         # conv1, bn1
    in_ch = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:  # downsample: 1×1 conv + bn
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    return shapes + [(num_classes, 2048), (num_classes,)]


def total(shapes):
    return sum(math.prod(s) for s in shapes)


assert len(gpt2_medium_shapes()) == 292 and total(gpt2_medium_shapes()) == 354_823_168
assert len(resnet50_shapes()) == 161 and total(resnet50_shapes()) == 25_557_032
