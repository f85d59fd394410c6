"""What an SQS event source mapping does around a Lambda invocation, with boto3 against a
local SQS (moto): receive messages and shape them as the Lambda SQS event, or delete the
ones the function reported delivered.

    sqs_event.py receive QUEUE_URL MAX    -> prints {"Records": [...]} (Lambda's shape)
    sqs_event.py delete QUEUE_URL RECEIPT_HANDLE...

Endpoint, region and (fake) credentials come from the AWS_* environment variables.
"""

import json
import os
import sys

import boto3


def client():
    return boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        region_name=os.environ["AWS_REGION"])


def receive(url, max_messages):
    sqs = client()
    arn = "arn:aws:sqs:%s:123456789012:%s" % (os.environ["AWS_REGION"], url.rsplit("/", 1)[1])
    records = []
    # A mapping polls until it has its batch or the queue is empty.
    while len(records) < max_messages:
        r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(10, max_messages - len(records)),
                                AttributeNames=["All"], MessageAttributeNames=["All"],
                                WaitTimeSeconds=0)
        msgs = r.get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            attrs = {}
            for name, a in m.get("MessageAttributes", {}).items():
                attrs[name] = {"stringValue": a.get("StringValue"), "stringListValues": [],
                               "binaryListValues": [], "dataType": a["DataType"]}
            records.append({
                "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"], "attributes": m.get("Attributes", {}),
                "messageAttributes": attrs, "md5OfBody": m.get("MD5OfBody"),
                "eventSource": "aws:sqs", "eventSourceARN": arn,
                "awsRegion": os.environ["AWS_REGION"],
            })
    print(json.dumps({"Records": records}))


def delete(url, handles):
    sqs = client()
    for h in handles:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=h)


if __name__ == "__main__":
    cmd, url = sys.argv[1], sys.argv[2]
    if cmd == "receive":
        receive(url, int(sys.argv[3]))
    elif cmd == "delete":
        delete(url, sys.argv[3:])
    else:
        sys.exit("unknown command " + cmd)
