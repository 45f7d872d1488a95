/* send.h — `luacallout send`: a gRPC client for a running server. It reads a request file
 * (the exchange format, docs/testing.md), runs each of its streams as one Process call and
 * prints every ProcessingResponse as a JSON line as it arrives, then the stream's status.
 * The same codec and JSON as `--check --request`, so the two outputs compare line by line. */
#ifndef LUACALLOUT_SEND_H
#define LUACALLOUT_SEND_H

/* argv[0] is the binary, argv[1] "send". Returns the exit code: 0 every stream ended OK,
 * 1 some stream did not (or the target was unreachable), 2 usage or file error. */
int send_main(int argc, char **argv);

#endif
