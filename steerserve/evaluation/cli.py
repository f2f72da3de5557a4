"""``steerserve eval``: measure a steering spec's effect against the unsteered model on the same prompts."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from steerserve.errors import SteerError

EPILOG = """\
strength sweep: each --coeffs value gives one setting in which every intervention's strength is set to it:
the --coeff-field where given, else the first of coeff/beta/gamma the intervention has (interventions
without one, e.g. ablate, stay as they are). Without --coeffs the spec runs as is. 'auto' sets the field to
"auto" (cot_compress: the gamma_max that `steerserve calibrate` stored). --also-spec, --also-prompt and
--also-temperature add side settings (another spec; the unsteered model on another prompt template; the
unsteered model sampled at temperature T, its distributions scored as softmax(logits / T), so its
choice_entropy and KL are those of the temperature-scaled distribution) after the sweep.

distribution metrics (kl, refusal_score, choice_entropy, decision_entropy): in-process, exact, on the hf
model by teacher forcing. With --server, approximated from the server's own top-k log-probabilities (the
OpenAI routes' logprobs: top 20 in chat, top 5 raw), nothing loaded locally: a token outside the top-k
counts as probability 0, and KL is taken at the first generated position over the tokens in both top-k sets
plus one 'other' bucket lumping the remaining mass (a lower bound); the report's notes say so. --exact
scores them on the LOCAL hf model instead: it loads the model and the artifact store from --home
($STEERSERVE_HOME), which must hold the spec's vectors (the shipped ones are imported at start-up).

format check: a setting whose well-formed share (well_formed, log_well_formed, final_answer) falls below
the baseline's 95% interval is flagged in the report ("format kept" row, and a note): an entropy gain
bought with broken answers shows.

example:
  steerserve eval --spec '{"interventions":[{"method":"add","vector":"joy","layers":[4,5,6,7,8],"coeff":1}]}' \\
      --data vectors/prompts/misery.txt --metric sentiment length --coeffs -1.5 1.5 --out eval-joy
  steerserve eval --spec '{"interventions":[{"method":"cot_compress","vector":"asc","gamma":1}]}' \\
      --data ../shared/data/gsm8k/train.jsonl --field question --answer-field answer --offset 5000 \\
      --limit 200 --prompt-template $'{prompt}\\nLet\\'s think step by step.' --metric length answer \\
      --max-tokens 256 --coeffs auto 1 2 --also-prompt $'concise={prompt}\\nBe concise.' --no-kl --out eval-asc
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from steerserve.evaluation import sweep
    from steerserve.evaluation.metrics import METRICS

    p = sub.add_parser("eval", help="measure a steering spec's effect (baseline vs steered, with intervals)",
                       description="Generate with and without a steering spec on the same prompts; report each "
                                   "metric with a bootstrap 95% interval, the baseline beside it, and the per-token "
                                   "KL of the steered to the unsteered next-token distribution.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, metavar="SPEC",
                   help="steering spec {\"interventions\": [...]} (the API's 'steering' field): a file or JSON text")
    p.add_argument("--data", type=Path, required=True, metavar="FILE",
                   help=".txt (a prompt per line), .json (list of strings or objects) or .jsonl (objects)")
    p.add_argument("--field", default="instruction", help="prompt key in JSON objects (default: instruction)")
    p.add_argument("--answer-field", default="answer", help="reference answer key, for --metric answer")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use N prompts")
    p.add_argument("--offset", type=int, default=0, metavar="K", help="skip the first K (hold out prompts)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="send each prompt as a user message, with the chat template (default)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="send the raw prompt text")
    p.add_argument("--metric", nargs="+", default=["sentiment"], choices=sorted(METRICS), metavar="M",
                   help=f"one or more of {', '.join(sorted(METRICS))} (default: sentiment)")
    p.add_argument("--options", nargs="+", default=(), metavar="TOKEN",
                   help="one-token answer options for choice_entropy, e.g. --options A B (chat replies start "
                        "without a space)")
    p.add_argument("--concept", nargs="+", default=(), metavar="WORD",
                   help="for --metric mentions: a topic (food, weather, country, animal, colour, sport, music, "
                        "code, maths, science: its words in evaluation/concepts.py) or the words themselves "
                        "(whole words, case-insensitive, plurals count), e.g. --concept pizza bread cheese")
    p.add_argument("--coeffs", nargs="+", type=sweep.parse_coeff, default=None, metavar="C",
                   help="strengths to sweep: numbers, or 'auto' (a method's calibrated strength)")
    p.add_argument("--coeff-field", default=None, metavar="NAME", help="the strength field to sweep")
    p.add_argument("--prompt-template", default=sweep.PLACEHOLDER, metavar="T",
                   help="what is sent for each prompt, with {prompt} where the data item goes, e.g. "
                        "$'{prompt}\\nLet\\'s think step by step.' in bash (default: the item as is)")
    p.add_argument("--also-spec", action="append", default=[], metavar="LABEL=SPEC",
                   help="another setting: SPEC (a file or JSON text) run as is, e.g. a random-vector control")
    p.add_argument("--also-prompt", action="append", default=[], metavar="LABEL=TEMPLATE",
                   help="another setting: the unsteered model on its own prompt template (with {prompt}), "
                        "e.g. a 'be concise' instruction baseline")
    p.add_argument("--also-temperature", action="append", default=[], metavar="LABEL=T",
                   help="another setting: the unsteered model sampled at temperature T, its distribution metrics "
                        "and KL those of softmax(logits / T), e.g. a temperature baseline at a method's KL")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per reply (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default: 0)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="replies per prompt and setting, sampled with seeds SEED..SEED+K-1 (the same in every "
                        "setting, so differences are paired); each prompt's value is the mean of its K, and "
                        "the intervals resample prompts (needs --temperature > 0; default: 1)")
    p.add_argument("--no-kl", dest="kl", action="store_false",
                   help="skip the KL column (it costs two forwards per sample)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="a running server (e.g. http://127.0.0.1:8000); default: an in-process hf engine")
    p.add_argument("--exact", action="store_true",
                   help="with --server: score the distribution metrics exactly on the local hf model (--home), "
                        "not from the server's top-k log-probabilities")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    p.add_argument("--home", type=Path, default=None, metavar="DIR",
                   help="model cache and artifact store of the local model (default: $STEERSERVE_HOME)")
    p.add_argument("--model", type=Path, default=None, metavar="PATH", help="local model (default: the default)")
    p.add_argument("--vectors-dir", type=Path, default=None, metavar="DIR",
                   help="import the artifacts in DIR into the local store (default: the repository's vectors/)")
    p.add_argument("--out", type=Path, default=Path("eval-out"), metavar="DIR",
                   help="where eval.json, eval.md, eval.png and replies.jsonl (written before scoring) go "
                        "(default: ./eval-out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from steerserve.config import default_vectors_dir
    from steerserve.evaluation import report, runner, sweep
    from steerserve.evaluation.concepts import concept_words
    from steerserve.evaluation.data import read_samples, with_draws
    from steerserve.evaluation.generate import Sampling

    try:
        if args.concurrency < 1 or args.max_tokens < 1:
            raise SteerError("--concurrency and --max-tokens must be >= 1")
        spec = sweep.load_spec(args.spec)
        settings = sweep.unique_labels([*sweep.settings(spec, args.coeffs, args.coeff_field),
                                        *sweep.side_settings(args.also_spec, args.also_prompt,
                                                                    args.also_temperature)])
        template = sweep.check_template(args.prompt_template, "--prompt-template")
        samples = read_samples(args.data, args.field, args.limit, args.offset, args.answer_field)
        if args.samples > 1 and args.temperature == 0:
            raise SteerError("more than one reply per prompt needs --temperature > 0 (greedy replies are all "
                             "the same)", field="--samples")
        prompts = len(samples)
        samples = with_draws(samples, args.samples)
        sampling = Sampling(args.max_tokens, args.temperature, args.seed, args.chat, template)
        opts = runner.Options(tuple(settings), tuple(args.metric), sampling, tuple(args.options), args.kl,
                              args.server, args.concurrency, args.seed, not args.quiet, args.home, args.model,
                              args.vectors_dir or default_vectors_dir(), args.out / "replies.jsonl", args.exact,
                              concept_words(args.concept))
        result = asyncio.run(runner.evaluate(samples, opts))
    except SteerError as exc:
        print(f"steerserve eval: {exc}", file=sys.stderr)
        return 2
    config = {"command": "steerserve " + shlex.join(sys.argv[1:]), "spec": spec, "data": str(args.data),
              "field": args.field, "offset": args.offset, "limit": args.limit, "prompts": prompts,
              "samples": args.samples, "chat": args.chat, "metrics": list(args.metric), "options": list(args.options),
              "concept": list(args.concept),
              "coeffs": args.coeffs, "coeff_field": args.coeff_field, "prompt_template": args.prompt_template,
              "also_spec": args.also_spec, "also_prompt": args.also_prompt,
              "also_temperature": args.also_temperature, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "seed": args.seed, "kl": args.kl,
              "server": args.server or "in-process (hf)", "exact": args.exact or args.server is None}
    title = f"{args.data.name}, {prompts} prompts" + (f" x {args.samples} replies" if args.samples > 1 else "") + \
            f", {'chat' if args.chat else 'raw'}, max_tokens {args.max_tokens}, temperature {args.temperature:g}: " \
            f"{result.model}"
    paths = report.write(result, args.out, config, title)
    print(report.markdown(result, title))
    print(report.samples_text(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
