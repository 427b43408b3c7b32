"""SigLIP (pairwise sigmoid loss with learned bias) on Fashion-MNIST: the demo with loss=siglip.

python -m scripts.train --config configs/siglip.py --workdir workdirs/siglip
args: as configs/demo.py (epochs, batch)
"""

from configs import demo


def get_config(arg=None):
    return demo.get_config(",".join(filter(None, ["loss=siglip", arg])))
