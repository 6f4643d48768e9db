"""The autoencoder family: KL autoencoders for latent diffusion, trained and exported here and
loaded through `common.autoencoders` (which names them only by their registered dotted names).

`kl_vae.AutoencoderKL` (diffusers' SD / SDXL / SD3 / FLUX VAE, weights from a user's local folder),
`small_kl.SmallKLAutoencoder` (ours, trained on Fashion-MNIST), `recipe.KLAutoencoderRecipe` (their
training objective as a trainer recipe) and `export.export_autoencoder` (a trained run -> an export
folder that `common.autoencoders.load_autoencoder` reads).
"""
