"""The world's judge on a trained autoencoder: reconstructions of 500 fresh scenes.

    python examples/vq-world/judge.py runs/vq-world/sharpen/vae
"""

import argparse
import json

from latentdiff.eval import world_reconstruction
from latentdiff.loading import load_component

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("vae", help="an exported autoencoder folder (config.json + weights)")
parser.add_argument("--scenes", type=int, default=500)
args = parser.parse_args()
vae = load_component(args.vae).eval()
print(json.dumps({"vae": args.vae, **world_reconstruction(vae, args.scenes)}))
