"""Chat with a checkpoint: interactive (history, /reset, /exit) or one-shot with --prompt.

python -m scripts.chat --model runs/sft/final
python -m scripts.chat --model runs/sft/final --prompt "What is the capital of France?" --temperature 0
python -m scripts.chat --model stores/4b --offload --memory-budget 1GB
"""

from __future__ import annotations

import argparse
import sys

from smallthinker.chat import ChatSession, SamplingConfig, chat_repl, load_chat_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (an expert store with --offload)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: checkpoint's"
    )
    p.add_argument("--offload", action="store_true", help="experts on disk (smallthinker.inference)")
    p.add_argument("--memory-budget", default="1GB", help="memory cap with --offload, e.g. 1GB")
    args = p.parse_args(argv)

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        model, tokenizer = load_chat_model(
            args.model, offload=args.offload, memory_budget=args.memory_budget, dtype=args.dtype
        )
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        p.error(str(e))
    session = ChatSession(model, tokenizer, system=args.system, sampling=sampling)
    if args.prompt is None:
        chat_repl(session)
        return
    reply = session.ask(args.prompt, stream_to=sys.stdout)
    print(reply.stats_line())


if __name__ == "__main__":
    main()
