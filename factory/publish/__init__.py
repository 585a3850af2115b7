"""`factory publish`: atomic publishing of a finished build to the Hugging Face Hub, and the run lock of scheduled builds."""
