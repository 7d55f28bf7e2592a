import argparse
from pathlib import Path

from qimg.train.train import main

parser = argparse.ArgumentParser(prog="python -m qimg.train", description="Train the built-in shapes model.")
parser.add_argument("out", type=Path, help="folder to write the model to (diffusers layout)")
parser.add_argument("--minutes", type=float, default=90.0, help="time budget for the whole run")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--scenes", type=int, default=8000, help="training scenes rendered and encoded")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
parser.add_argument("--resume", type=Path, default=None, help="an exported model to train further (keeps its VAE)")
parser.add_argument("--fresh-embeddings", action="store_true",
                    help="with --resume: re-draw the text encoder's token embeddings at unit scale")
parser.add_argument("--new-tokenizer", action="store_true",
                    help="with --resume: build the tokenizer afresh and move the text encoder's embeddings to it")
parser.add_argument("--vae-from", type=Path, default=None,
                    help="take the trained VAE of an exported model instead of training one")
parser.add_argument("--lr", type=float, default=3e-4,
                    help="peak learning rate of the MMDiT and text encoder (a third of it with --resume alone)")
parser.add_argument("--shifted", type=float, default=0.25,
                    help="share of each batch's timesteps shifted towards noise, where the prompt decides the scene")
parser.add_argument("--object-weight", type=float, default=4.0,
                    help="weight of the object tokens' errors against the background's")
parser.add_argument("--contrast", type=float, default=1.0,
                    help="weight of the shape contrast: captions naming other shapes must fit the scene worse")
parser.add_argument("--margin", type=float, default=0.1,
                    help="how much worse (relative) the other shapes' captions must fit, under the contrast")
args = parser.parse_args()
if (args.new_tokenizer or args.fresh_embeddings) and not args.resume:
    parser.error("--new-tokenizer and --fresh-embeddings need --resume")
if args.new_tokenizer and args.fresh_embeddings:
    parser.error("--fresh-embeddings would overwrite the embeddings --new-tokenizer carries over")
main(args.out, args.minutes, args.seed, args.scenes, args.threads, args.resume, args.fresh_embeddings,
     args.vae_from, args.lr, args.shifted, args.object_weight, args.contrast, args.margin,
     args.new_tokenizer)
