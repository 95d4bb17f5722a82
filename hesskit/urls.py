"""The repository's public address, in one place. Publishing under another name changes these
two lines; a test checks that the README's badges and every notebook's Colab install cell agree."""

REPOSITORY = "hesskit/hesskit"  # GitHub owner/name
REF = "main"  # the branch notebooks install from in Colab and that the badges open (the repository has no tags yet)


def github_url() -> str:
    return f"https://github.com/{REPOSITORY}"


def colab_url(notebook: str) -> str:
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{REF}/notebooks/{notebook}"


def binder_url(notebook: str) -> str:
    return f"https://mybinder.org/v2/gh/{REPOSITORY}/{REF}?labpath=notebooks%2F{notebook}"


def colab_install_spec() -> str:
    return f"hesskit @ git+https://github.com/{REPOSITORY}@{REF}"
