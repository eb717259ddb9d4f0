"""What a test reads from an exception that MONAI's config parser wrapped ("Failed to evaluate ...")."""


def message_chain(error: BaseException | None) -> str:
    """Every message of an exception chain (causes and contexts), one per line."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)
