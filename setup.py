"""Packaging for hessian_eigenthings."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hessian_eigenthings",
    version="1.0.0",
    description="Eigenvalues and eigenvectors of loss Hessians and other large symmetric operators, matrix-free.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hessian_eigenthings", "hessian_eigenthings.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.22", "scipy>=1.9", "tqdm>=4.60"],
    extras_require={
        "test": ["pytest>=7", "scikit-learn>=1.0", "matplotlib>=3.5"],
        "examples": ["scikit-learn>=1.0", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
    },
    license="MIT",
)
