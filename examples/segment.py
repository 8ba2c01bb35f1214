"""Restore the spaces of English text with the default segmenter model.

    python examples/segment.py "thequickbrownfoxjumpsoverthelazydog"
    echo "some text" | python examples/segment.py

It removes spaces, encodes each character with the model's vocabulary (from the service),
asks ``POST /infer`` for per-character probabilities, and puts a space after every
character where "a word ends here" is more likely than not.
"""

from __future__ import annotations

import argparse
import sys

import httpx


def encode(text: str, tokens: list[str]) -> list[int]:
    index = {token: i for i, token in enumerate(tokens)}
    unknown = 1
    return [index.get(char, unknown) for char in text]


def restore_spaces(text: str, probabilities: list[list[float]]) -> str:
    out = []
    for char, (_, word_ends) in zip(text, probabilities):
        out.append(char)
        if word_ends > 0.5:
            out.append(" ")
    return "".join(out).rstrip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="*", help="text to segment (default: read standard input)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    args = parser.parse_args()
    text = "".join((" ".join(args.text) if args.text else sys.stdin.read()).split())
    if not text:
        parser.error("no text given")
    with httpx.Client(base_url=args.url, timeout=30) as client:
        tokens = client.get("/v1/model/vocabulary").raise_for_status().json()["tokens"]
        response = client.post("/infer", json={"sequences": [encode(text, tokens)]})
        if response.status_code != 200:
            print(f"error {response.status_code}: {response.text}", file=sys.stderr)
            return 1
    print(restore_spaces(text, response.json()["outputs"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
