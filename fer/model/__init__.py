"""The model: the backbone registry (`backbones`), our own layers (`layers`: in-model preprocessing,
augmentation, the head's dropout) and building, staging and loading a classifier (`build`)."""
