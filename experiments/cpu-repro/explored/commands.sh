# The CPU exploration of cpu_repro.py's setting (README: "What was explored"), one line per run;
# co.py, the private loop these ran, was removed after it (git show eddb7c9:experiments/cpu-repro/explored/co.py);
# each wrote the .jsonl of the same name (runs that were stopped early have fewer epochs).
python docs/cpu-repro/explored/co.py --act softplus --eps 10 --init zero --alpha 1 --out docs/cpu-repro/explored/sp-1x4-e10-zero.jsonl
python docs/cpu-repro/explored/co.py --act relu --eps 10 --init zero --alpha 1 --out docs/cpu-repro/explored/relu-1x4-e10-zero.jsonl
python docs/cpu-repro/explored/co.py --act softplus --eps 8 --init random --alpha 1.25 --out docs/cpu-repro/explored/sp-1x4-e8-rs125.jsonl
python docs/cpu-repro/explored/co.py --act relu --eps 10 --init zero --alpha 1 --no-norm --out docs/cpu-repro/explored/relu-1x4-e10-zero-nonorm.jsonl
python docs/cpu-repro/explored/co.py --act softplus --eps 10 --init zero --alpha 1 --no-norm --out docs/cpu-repro/explored/sp-1x4-e10-zero-nonorm.jsonl
python docs/cpu-repro/explored/co.py --act softplus --eps 16 --init zero --alpha 1 --out docs/cpu-repro/explored/sp-1x4-e16-zero.jsonl
python docs/cpu-repro/explored/co.py --act softplus --filters 16 --eps 12 --init zero --alpha 1 --out docs/cpu-repro/explored/sp-1x16-e12-zero.jsonl
python docs/cpu-repro/explored/co.py --cnn 32,32,64,64 --eps 8 --init random --alpha 2 --opt sgd --lr 0.2 --sched cyclic --epochs 15 --evals-per-epoch 2 --out docs/cpu-repro/explored/vgg32-e8-rs2.jsonl
python docs/cpu-repro/explored/co.py --cnn 32,32,64,64 --eps 12 --init zero --alpha 1 --opt sgd --lr 0.2 --sched cyclic --epochs 15 --evals-per-epoch 2 --out docs/cpu-repro/explored/vgg32-e12-zero.jsonl
python docs/cpu-repro/explored/co.py --classes 4,8 --cnn 16,16,32,32 --eps 8 --init zero --alpha 1 --opt sgd --lr 0.2 --sched cyclic --epochs 30 --evals-per-epoch 1 --out docs/cpu-repro/explored/bin-vgg16-e8-zero.jsonl
python docs/cpu-repro/explored/co.py --classes 4,8 --cnn 16,16,32,32 --eps 16 --init zero --alpha 1 --opt sgd --lr 0.2 --sched cyclic --epochs 30 --evals-per-epoch 1 --out docs/cpu-repro/explored/bin-vgg16-e16-zero.jsonl
python docs/cpu-repro/explored/co.py --cnn 16,16,32,32 --eps 12 --init zero --alpha 1 --opt sgd --lr 0.2 --sched cyclic --epochs 15 --evals-per-epoch 1 --out docs/cpu-repro/explored/vgg16-e12-zero.jsonl
python docs/cpu-repro/explored/co.py --cnn 16,16,32,32 --eps 8 --init random --alpha 2 --opt sgd --lr 0.2 --sched cyclic --epochs 15 --evals-per-epoch 1 --out docs/cpu-repro/explored/vgg16-e8-rs2.jsonl
python docs/cpu-repro/explored/co.py --filters 64 --act relu --eps 8 --init zero --alpha 1 --no-norm --out docs/cpu-repro/explored/cnn1x64-relu-e8-zero.jsonl
python docs/cpu-repro/explored/co.py --filters 64 --act softplus --eps 8 --init zero --alpha 1 --no-norm --out docs/cpu-repro/explored/cnn1x64-sp-e8-zero.jsonl
