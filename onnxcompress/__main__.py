from onnxcompress.cli import main

main()
